"""Where generation gets its neighbours: what one chunk retrieved (``Neighbours``), the ``Retriever``
protocol, and the retriever that searches a DB in this process.

A retriever takes the LM tokens of the chunk just completed and returns the ids of its k nearest
DB chunks and their [N, F] tokens (chunk and continuation, r = 2m, padded), which condition the
next chunk through CCA; with ``align``, each window moved along its document to line up with the
chunk (``TokenStore.aligned_neighbour_tokens``, for models with ``align_neighbours``).
``LocalRetriever`` searches the DB here (``retro_db``); ``index_service.client.ServiceRetriever``
asks a running index service and satisfies the same protocol (this package never imports the
service). Both return the same neighbours for the same DB and nprobe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from retro_db.embedder import ChunkEmbedder
from retro_db.manifest import require_stages
from retro_db.search import RetrievalIndex
from retro_db.token_store import TokenStore
from retro_db.tokenizer import PAD, db_tokenizer, special_id


@dataclass(frozen=True)
class Neighbours:
    """What one chunk retrieved, nearest first."""

    ids: np.ndarray  # (k,) int64, -1 where fewer exist
    rows: np.ndarray  # (k, 2m) the [N, F] tokens the model reads, padded
    distances: np.ndarray | None = None  # (k,) squared L2, where the retriever reports them
    shifts: np.ndarray | None = None  # (k,) tokens each window was moved along its document (align)


class Retriever(Protocol):
    k: int

    def __call__(self, chunk_tokens: list[int]) -> Neighbours:
        """chunk tokens -> its k neighbours."""


def neighbour_rows(
    store: TokenStore, ids: np.ndarray, chunk: list[int], pad_id: int, *, align: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """[N, F] rows (k, 2m) of the neighbour ``ids`` of one chunk, and with ``align`` the shifts (k,)
    that lined each window up with ``chunk``'s tokens."""
    if align:
        return store.aligned_neighbour_tokens(ids, [np.asarray(chunk)] * len(ids), pad_id)
    return store.neighbour_tokens(ids, pad_id), None


class LocalRetriever:
    """Embeds the chunk with the DB's frozen BERT and searches the DB's index in this process."""

    def __init__(
        self, db: str, *, k: int = 2, nprobe: int | None = None, device: str | None = None, align: bool = False
    ):
        manifest = require_stages(db)
        tokenizer = db_tokenizer(db)
        model = manifest["stages"]["embeddings"]["config"]["model"]
        self.embedder = ChunkEmbedder(model, lm_tokenizer_json=tokenizer.to_str(), device=device)
        self.index, self.store, self.k, self.nprobe, self.align = RetrievalIndex(db), TokenStore(db), k, nprobe, align
        self.pad_id = special_id(tokenizer, PAD)

    def __call__(self, chunk_tokens: list[int]) -> Neighbours:
        distances, ids = self.index.search(self.embedder.embed_token_chunks([chunk_tokens]), self.k, nprobe=self.nprobe)
        rows, shifts = neighbour_rows(self.store, ids[0], chunk_tokens, self.pad_id, align=self.align)
        return Neighbours(ids[0], rows, distances[0], shifts)

    def search(self, chunks: list[list[int]], k: int) -> np.ndarray:
        """Neighbour chunk ids of many chunks in one embedding and search pass. (n, k), -1 where fewer exist"""
        _, ids = self.index.search(self.embedder.embed_token_chunks(chunks), k, nprobe=self.nprobe)
        return ids
