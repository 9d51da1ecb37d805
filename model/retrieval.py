"""Where generation gets its neighbours: the ``Retriever`` protocol and its two implementations.

A retriever takes the LM tokens of the chunk just completed and returns the ids of its k nearest
DB chunks and their [N, F] tokens (chunk and continuation, r = 2m, padded), which condition the
next chunk through CCA; with ``align``, each window moved along its document to line up with the
chunk (``TokenStore.aligned_neighbour_tokens``, for models with ``align_neighbours``). ``LocalRetriever`` searches the DB in this process (``retro_db``);
``ServiceRetriever`` asks a running index service (``make serve``). Both return the same neighbours
for the same DB and nprobe.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from index_service.client import IndexClient
from retro_db.embedder import ChunkEmbedder
from retro_db.manifest import require_stages
from retro_db.search import RetrievalIndex
from retro_db.token_store import TokenStore
from retro_db.tokenizer import PAD, db_tokenizer, special_id


class Retriever(Protocol):
    k: int

    def __call__(self, chunk_tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """chunk tokens -> (neighbour chunk ids (k,), -1 where fewer exist; [N, F] tokens (k, 2m))."""


class LocalRetriever:
    """Embeds the chunk with the DB's frozen BERT and searches the DB's index in this process."""

    def __init__(self, db: str, *, k: int = 2, nprobe: int | None = None, device: str | None = None, align: bool = False):
        manifest = require_stages(db)
        tokenizer = db_tokenizer(db)
        self.embedder = ChunkEmbedder(manifest["stages"]["embeddings"]["config"]["model"], lm_tokenizer_json=tokenizer.to_str(), device=device)
        self.index, self.store, self.k, self.nprobe, self.align = RetrievalIndex(db), TokenStore(db), k, nprobe, align
        self.pad_id = special_id(tokenizer, PAD)

    def __call__(self, chunk_tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.search([chunk_tokens], self.k)[0]
        if self.align:
            return ids, self.store.aligned_neighbour_tokens(ids, [np.asarray(chunk_tokens)] * len(ids), self.pad_id)[0]
        return ids, self.store.neighbour_tokens(ids, self.pad_id)  # (k,), (k, 2m)

    def search(self, chunks: list[list[int]], k: int) -> np.ndarray:
        """Neighbour chunk ids of many chunks in one embedding and search pass. (n, k), -1 where fewer exist"""
        _, ids = self.index.search(self.embedder.embed_token_chunks(chunks), k, nprobe=self.nprobe)
        return ids


class ServiceRetriever:
    """Asks the index service by LM tokens; the DB's tokenizer and chunk size shape the rows."""

    def __init__(self, client: IndexClient, *, k: int = 2, chunk_size: int = 64, pad_id: int = 0, nprobe: int | None = None,
                 align: bool = False):
        self.client, self.k, self.m, self.pad_id, self.nprobe, self.align = client, k, chunk_size, pad_id, nprobe, align

    @classmethod
    def for_db(cls, url: str, db: str, *, k: int = 2, nprobe: int | None = None, align: bool = False) -> "ServiceRetriever":
        """A retriever over the service at ``url`` serving ``db`` (read here for its tokenizer and chunk size)."""
        chunk_size = require_stages(db, ("chunks",))["stages"]["chunks"]["config"]["chunk_size"]
        return cls(IndexClient(url), k=k, chunk_size=chunk_size, pad_id=special_id(db_tokenizer(db), PAD), nprobe=nprobe, align=align)

    def __call__(self, chunk_tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        results = self.client.search(token_ids=[chunk_tokens], k=self.k, nprobe=self.nprobe, return_tokens=True, align=self.align)[0]
        ids = np.full(self.k, -1, dtype=np.int64)
        rows = np.full((self.k, 2 * self.m), self.pad_id, dtype=np.int64)
        for j, hit in enumerate(results):
            ids[j] = hit["chunk_id"]
            rows[j, : len(hit["tokens"])] = hit["tokens"]
            rows[j, self.m : self.m + len(hit["continuation_tokens"])] = hit["continuation_tokens"]
        return ids, rows
