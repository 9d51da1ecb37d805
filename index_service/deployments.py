"""The index service's inner deployments: shard searchers and the query embedder.

Each ``ShardSearcher`` group holds every G-th index shard of the DB and its increments and returns
its merged approximate top c (``retro_db.search``); the ``QueryEmbedder`` is the DB's frozen BERT.
Both batch concurrent requests (``@serve.batch``) and check the DB's state (two ``stat`` calls)
before each batch, so a deletion or an added increment reaches every replica without a restart.
"""

import asyncio
import logging

import faiss
import numpy as np
from ray import serve

from retro_db import deletions, layout
from retro_db import manifest as mf
from retro_db.embedder import ChunkEmbedder
from retro_db.search import IndexShard, deleted_selector, index_shard_paths, search_shards

log = logging.getLogger("index_service")


@serve.deployment(max_ongoing_requests=64)
class ShardSearcher:
    """Holds every ``groups``-th index shard, searches them, returns their merged approximate top c.

    The IVF-PQ codes are in RAM unless ``mmap`` (faiss's memory-mapped inverted lists searched 4x
    slower on this machine).
    """

    def __init__(self, db: str, group: int, groups: int, *, threads: int = 1, mmap: bool = False, max_batch_size: int = 32,
                 batch_wait_s: float = 0.002):
        faiss.omp_set_num_threads(threads)  # what this replica reserved; faiss would take every core
        self.search.set_max_batch_size(max_batch_size)
        self.search.set_batch_wait_timeout_s(batch_wait_s)
        self.db, self.group, self.groups, self.mmap = db, group, groups, mmap
        self.shards: dict = {}
        self.selector, self.n_deleted = None, 0
        self._manifest_sig = self._deleted_sig = None
        self.nprobe = 8
        self.refresh()

    def refresh(self) -> None:
        sig = mf.stat_signature(layout.manifest_path(self.db))
        if sig != self._manifest_sig:
            index = mf.read_manifest(self.db)["stages"].get("index", {})
            if index.get("status") == "complete":  # mid-rebuild: keep serving what is loaded
                mine = index_shard_paths(self.db)[self.group :: self.groups]
                for path in set(self.shards) - set(mine):
                    del self.shards[path]
                for path in mine:
                    if path not in self.shards:
                        self.shards[path] = IndexShard(path, mmap=self.mmap)
                        log.info("shard group %d: loaded %s (%d vectors)", self.group, path, self.shards[path].ntotal)
                self.nprobe = index.get("default_nprobe") or self.nprobe
            self._manifest_sig = sig
        dsig = deletions.deletions_signature(self.db)
        if dsig != self._deleted_sig:
            deleted = deletions.deleted_chunk_ids(self.db)
            self.selector, self.n_deleted, self._deleted_sig = deleted_selector(deleted), len(deleted), dsig

    def search_many(self, requests: list[tuple[np.ndarray, int, int | None]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Searches a batch of requests, one faiss call per distinct (k, nprobe)."""
        self.refresh()
        out = [None] * len(requests)
        for key in {(k, nprobe) for _, k, nprobe in requests}:
            idx = [i for i, (_, k, nprobe) in enumerate(requests) if (k, nprobe) == key]
            k, nprobe = key
            queries = np.ascontiguousarray(np.concatenate([requests[i][0] for i in idx]), dtype=np.float32)
            if self.shards:
                dists, ids = search_shards(list(self.shards.values()), queries, k, nprobe=nprobe or self.nprobe, selector=self.selector)
            else:  # more groups than shards: this one holds none
                dists, ids = np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
            start = 0
            for i in idx:
                n = len(requests[i][0])
                out[i] = (dists[start : start + n], ids[start : start + n])
                start += n
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.004)
    async def search(self, requests: list[tuple[np.ndarray, int, int | None]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(queries (n, d), c, nprobe) -> approximate (distances (n, c), ids (n, c)); faiss runs off the event loop."""
        return await asyncio.to_thread(self.search_many, requests)

    def stats(self) -> dict:
        self.refresh()
        return {"group": self.group, "replica": serve.get_replica_context().replica_id.to_full_id_str(),
                "index_shards": len(self.shards), "vectors": sum(s.ntotal for s in self.shards.values()), "deleted_chunks": self.n_deleted}

    def check_health(self) -> None:
        if not mf.stat_signature(layout.manifest_path(self.db)):
            raise RuntimeError(f"{layout.manifest_path(self.db)} has gone away")


@serve.deployment(max_ongoing_requests=64)
class QueryEmbedder:
    """The DB's frozen BERT: a list of texts per request, requests batched across callers."""

    def __init__(self, db: str, *, threads: int = 1, max_batch_size: int = 32, batch_wait_s: float = 0.004):
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_s)

        model = mf.require_stages(db)["stages"]["embeddings"]["config"]["model"]
        self.embedder = ChunkEmbedder(model, threads=threads)

    def embed_many(self, requests: list[list[str]]) -> list[np.ndarray]:
        vectors = self.embedder.embed_texts([t for texts in requests for t in texts])
        splits = np.cumsum([len(texts) for texts in requests])[:-1]
        return np.split(vectors, splits)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.004)
    async def embed(self, requests: list[list[str]]) -> list[np.ndarray]:
        """texts -> (n, d) float32 per request."""
        return await asyncio.to_thread(self.embed_many, requests)
