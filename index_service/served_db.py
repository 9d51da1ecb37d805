"""The DB as the ingress serves it: one consistent view of its token store, vectors and catalogue,
reloaded when the manifest changes (an increment added), the documents deleted now, and the last
step of a search (merge the shard groups' candidates, re-rank them exactly). No Ray, no Serve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from model.retrieval import Neighbours, neighbour_rows
from retro_db import deletions
from retro_db import manifest as mf
from retro_db.documents import DocumentCatalog
from retro_db.search import load_indexed_vectors, merge_top_k, search_defaults, top_k
from retro_db.token_store import ShardedRows, TokenStore
from retro_db.watch import DBWatch


@dataclass(frozen=True)
class DBView:
    """What one version of the manifest serves, swapped whole, so that a request never mixes two."""

    store: TokenStore
    vectors: ShardedRows  # what re-ranking reads
    rerank_factor: int
    documents: DocumentCatalog


class ServedDB:
    def __init__(self, db: str):
        self.db, self.watch = db, DBWatch(db)
        self.refresh()

    def refresh(self) -> None:
        """Reloads what changed on disk (two ``stat`` calls when nothing did)."""
        if self.watch.manifest_changed():  # increments add token shards and vectors
            _, rerank_factor = search_defaults(mf.read_manifest(self.db))
            self.view = DBView(
                TokenStore(self.db), load_indexed_vectors(self.db), rerank_factor, DocumentCatalog(self.db)
            )
        if self.watch.deletions_changed():
            self.deleted_docs = set(deletions.deleted_doc_ids(self.db).tolist())

    def current_view(self, ids: np.ndarray) -> DBView:
        """The view that knows every one of ``ids``: a shard group can load an increment a moment
        before this replica sees the manifest that registers it (then it is reread, not a 500)."""
        found = ids[ids >= 0]
        if found.size and found.max() >= len(self.view.vectors):
            self.refresh()
        return self.view

    def view_for(self, hits: dict[int, Neighbours]) -> DBView:
        """The view that knows every neighbour of ``hits``."""
        return self.current_view(np.concatenate([h.ids for h in hits.values()]) if hits else np.zeros(0, np.int64))

    def chunk_view(self, chunk_id: int) -> TokenStore:
        """The token store holding ``chunk_id``; LookupError (saying why) for unknown or deleted chunks."""
        self.refresh()
        store = self.view.store
        try:
            doc = int(store.doc_of([chunk_id])[0])
        except KeyError:
            raise LookupError(
                f"chunk {chunk_id} does not exist in {os.path.basename(os.path.abspath(self.db))}"
            ) from None
        if doc in self.deleted_docs:
            raise LookupError(f"chunk {chunk_id} belongs to document {doc}, which was deleted")
        return store

    def neighbours(
        self, dists: np.ndarray, ids: np.ndarray, chunks: list[list[int]], pad_id: int, *, align: bool
    ) -> list[Neighbours]:
        """Each chunk's search result (distances (n, k), ids (n, k)) with the [N, F] rows the model reads."""
        store, out = self.current_view(ids).store, []
        for d, i, chunk in zip(dists, ids, chunks):
            rows, shifts = neighbour_rows(store, i, chunk, pad_id, align=align)
            out.append(Neighbours(i, rows, d, shifts))
        return out

    def change(self, action: str, doc_ids: list[int], *, reason: str, actor: str) -> dict:
        """Deletes or restores documents (``retro_db.deletions.change``: audited, atomic, under the DB's lock)."""
        self.refresh()
        return deletions.change(self.db, doc_ids, self.view.store, action=action, reason=reason, actor=actor)

    def top_k(
        self, parts: list[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, c: int, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The shard groups' candidates (distances (n, c), ids (n, c)) of ``queries`` (n, d) merged and
        re-ranked to the top k, as ``RetrievalIndex.search`` does in one process."""
        dists, ids = merge_top_k(parts, c)
        view = self.current_view(ids)
        return top_k(view.vectors, queries, dists, ids, k, view.rerank_factor)
