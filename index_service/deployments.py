"""The index service's inner parts: shard groups and the query embedder.

A ``ShardGroup`` holds every G-th index shard of the DB and its increments and returns its merged
approximate top c (``retro_db.search``). With one group the ingress holds it itself (no hop); with
G > 1 each group is a ``ShardSearcher`` deployment. The ``QueryEmbedder`` is the DB's frozen BERT.
A shard group checks the DB's state (``retro_db.watch``) before each batch, so a deletion or an
added increment reaches every replica without a restart.
"""

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
from ray import serve

from index_service import api
from retro_db import deletions, layout
from retro_db import manifest as mf
from retro_db.embedder import ChunkEmbedder
from retro_db.search import (
    FALLBACK_NPROBE,
    IndexShard,
    deleted_selector,
    index_shard_paths,
    search_defaults,
    search_shards,
)
from retro_db.watch import DBWatch

log = logging.getLogger("index_service")

# (queries (n, d) float32, c candidates, nprobe or None for the DB's default)
SearchRequest = tuple[np.ndarray, int, int | None]


class Unavailable(RuntimeError):
    """A shard group, the embedder or the model failed mid-request: Serve restarts it, the client retries (503)."""


async def remote(what: str, call):
    """The result of a deployment's call; a replica that died mid-request is ``Unavailable``."""
    try:
        return await call
    except Exception as e:
        log.warning("%s failed: %s", what, e)
        raise Unavailable(f"{what}: {type(e).__name__}") from None


@dataclass
class Retrieval:
    """One search request's query vectors on their way through a batch."""

    vectors: np.ndarray  # (n, d)
    k: int
    c: int  # candidates per shard group: k * rerank_factor
    nprobe: int | None

    @staticmethod
    def batch_size(batch: list["Retrieval"]) -> int:
        """Queries in a batch of search requests (what ``@serve.batch`` counts to its max_batch_size)."""
        return sum(len(r.vectors) for r in batch)


def texts_in(batch: list[list[str]]) -> int:
    """Texts in a batch of calls that carry a list each (what ``@serve.batch`` counts to its max_batch_size)."""
    return sum(len(texts) for texts in batch)


def split_rows(array: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """The rows of a batch's result back to the requests that held ``sizes`` rows each."""
    return np.split(array, np.cumsum(sizes)[:-1])


def replica_object():
    """This Serve replica's deployment object (the ``Ingress`` of an ingress replica): where the HTTP
    middleware, auth and schema find its settings. Serve serves a copy of the FastAPI app unpickled
    in the replica, so what ``__init__`` set on a module's globals is not what the copy's functions see."""
    return serve.get_replica_context().servable_object


def replica_name() -> str:
    """This Serve replica's actor name (what ``/healthz`` reports, and what ``ray.kill`` takes)."""
    return serve.get_replica_context().replica_id.to_full_id_str()


class ShardGroup:
    """Every ``groups``-th index shard of the DB (increments included), kept in step with the manifest.

    The IVF-PQ codes are in RAM unless ``mmap`` (faiss's memory-mapped inverted lists search slower,
    docs/BENCHMARKS.md, Stage 5).
    """

    def __init__(self, db: str, group: int = 0, groups: int = 1, *, threads: int = 1, mmap: bool = False):
        self.db, self.group, self.groups, self.mmap = db, group, groups, mmap
        # One search thread, so one OpenMP team of ``threads``: with a worker thread per batch in
        # flight, each batch started a team of its own and the teams fought for the cores. OpenMP's
        # count is per calling thread (a fractional-CPU Ray actor starts it at 1): set on this thread.
        self.worker = ThreadPoolExecutor(
            1, thread_name_prefix=f"faiss-{group}", initializer=faiss.omp_set_num_threads, initargs=(threads,)
        )
        self.shards: dict[str, IndexShard] = {}
        self.selector, self.n_deleted = None, 0
        self.watch, self.nprobe = DBWatch(db), FALLBACK_NPROBE
        self.refresh()

    def refresh(self) -> None:
        if self.watch.manifest_changed():
            manifest = mf.read_manifest(self.db)
            if (
                manifest["stages"].get("index", {}).get("status") == "complete"
            ):  # mid-rebuild: keep serving what is loaded
                mine = index_shard_paths(self.db)[self.group :: self.groups]
                shards = {path: self.shards.get(path) or IndexShard(path, mmap=self.mmap) for path in mine}
                for path in set(shards) - set(self.shards):
                    log.info("shard group %d: loaded %s (%d vectors)", self.group, path, shards[path].ntotal)
                self.shards = shards  # swapped whole: a search running in another thread keeps the dict it took
                self.nprobe, _ = search_defaults(manifest)
        if self.watch.deletions_changed():
            deleted = deletions.deleted_chunk_ids(self.db)
            self.selector, self.n_deleted = deleted_selector(deleted), len(deleted)

    async def search(self, requests: list[SearchRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``search_many`` on the group's search thread; concurrent batches queue for it."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, self.search_many, requests)

    def search_many(self, requests: list[SearchRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Searches a batch of requests, one faiss call per shard and distinct (c, nprobe)."""
        self.refresh()
        shards, selector = list(self.shards.values()), self.selector
        out = [None] * len(requests)
        for key in {(c, nprobe) for _, c, nprobe in requests}:
            idx = [i for i, (_, c, nprobe) in enumerate(requests) if (c, nprobe) == key]
            c, nprobe = key
            queries = np.ascontiguousarray(np.concatenate([requests[i][0] for i in idx]), dtype=np.float32)
            if shards:
                dists, ids = search_shards(shards, queries, c, nprobe=nprobe or self.nprobe, selector=selector)
            else:  # more groups than shards: this one holds none
                dists, ids = np.full((len(queries), c), np.inf, np.float32), np.full((len(queries), c), -1, np.int64)
            sizes = [len(requests[i][0]) for i in idx]
            for i, d, j in zip(idx, split_rows(dists, sizes), split_rows(ids, sizes)):
                out[i] = (d, j)
        return out

    def stats(self) -> dict:
        self.refresh()
        return {
            "group": self.group,
            "index_shards": len(self.shards),
            "vectors": sum(s.ntotal for s in self.shards.values()),
            "deleted_chunks": self.n_deleted,
        }


async def service_health(local: ShardGroup | None, searchers: list, *, increments: int) -> dict:
    """The service's health (``api.Health``) from its shard groups' stats: the ingress's own group, or
    each searcher's."""
    if local is not None:
        groups = [{**local.stats(), "replica": replica_name()}]
    else:
        groups = await asyncio.gather(*(s.stats.remote() for s in searchers))
    return {
        "status": "ok",
        "vectors": sum(g["vectors"] for g in groups),
        "index_shards": sum(g["index_shards"] for g in groups),
        "shard_groups": groups,
        "deleted_chunks": max(g["deleted_chunks"] for g in groups),
        "increments": increments,
    }


@serve.deployment(max_ongoing_requests=64)
class ShardSearcher:
    """One shard group as a deployment (G > 1). The ingress sends it one call per batch of requests."""

    def __init__(self, db: str, group: int, groups: int, *, threads: int = 1, mmap: bool = False):
        self.group = ShardGroup(db, group, groups, threads=threads, mmap=mmap)

    async def search(self, requests: list[SearchRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(queries (n, d), c, nprobe)] -> [(distances (n, c), ids (n, c))]; faiss runs off the event loop."""
        return await self.group.search(requests)

    def stats(self) -> dict:
        return {**self.group.stats(), "replica": replica_name()}

    def check_health(self) -> None:
        if not mf.stat_signature(layout.manifest_path(self.group.db)):
            raise RuntimeError(f"{layout.manifest_path(self.group.db)} has gone away")


def embed_batch_size(device: str) -> int:
    """Texts per BERT forward pass. On CPUs small batches win (the activations of a large batch leave
    the caches; docs/BENCHMARKS.md, Stage 5); a GPU wants large ones."""
    return 128 if device.startswith("cuda") else 8


@serve.deployment(max_ongoing_requests=64)
class QueryEmbedder:
    """The DB's frozen BERT: a list of texts per call. Concurrent calls (one per ingress batch) are
    batched again here, so several ingress replicas share forward passes; one worker thread runs
    them, so torch's threads never compete with each other."""

    def __init__(self, db: str, *, threads: int = 1, max_batch_texts: int = 256):
        self.embed.set_max_batch_size(max_batch_texts)
        model = mf.require_stages(db)["stages"]["embeddings"]["config"]["model"]
        self.embedder = ChunkEmbedder(model, threads=threads)
        self.embedder.batch_size = embed_batch_size(self.embedder.device)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="bert")
        log.info(
            "query embedder: %d torch threads, %d CPUs on the node, %s", threads, os.cpu_count(), self.embedder.device
        )

    def embed_many(self, requests: list[list[str]]) -> list[np.ndarray]:
        vectors = self.embedder.embed_texts([t for texts in requests for t in texts])
        return split_rows(vectors, [len(texts) for texts in requests])

    # No wait: calls queue while a batch runs, and the next batch takes whatever has queued. The
    # largest batch is set in __init__.
    @serve.batch(max_batch_size=api.MAX_QUERIES, batch_wait_timeout_s=0.0, batch_size_fn=texts_in)
    async def embed(self, requests: list[list[str]]) -> list[np.ndarray]:
        """texts -> (n, d) float32 per call."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, self.embed_many, requests)
