"""Nearest-chunk search over a DB's sharded IVF-PQ index, with exact re-ranking.

``RetrievalIndex`` asks every index shard (the DB's and its increments') for ``rerank_factor * k``
candidates, merges them and re-ranks them by exact squared L2 on the fp16 embeddings memory-mapped
from ``DB/embeddings``: plain PQ codes plateau near 0.7 recall@10 on 384-d text embeddings; the
re-ranking stage (what faiss ``IndexRefine`` and SCaNN do) lifts it above 0.9 without holding the
vectors in RAM. Every merge orders by (distance, id) (``merge_top_k``), so one process and shards
spread over many servers (``index_service``) give the same answer. Deleted documents
(``retro_db.deletions``) are excluded inside faiss, so k results still come back.

On a GPU (``device="gpu"``, faiss's GPU build) the IVF-PQ shards are searched there; GPU indexes
take no id selector, so deleted ids are dropped from the candidates afterwards (a query may then get
fewer than k results where deletions crowd its candidates).

Axes: n queries, k results, c candidates, d embedding dim. Ids are chunk ids; -1 where fewer exist.
"""

from __future__ import annotations

import os

import faiss
import numpy as np

from retro_db import deletions, layout
from retro_db import manifest as mf
from retro_db.token_store import ShardedRows, first_chunk_id


def load_embedding_rows(db: str, split: str | tuple[str, ...] | None = "train") -> ShardedRows:
    """fp16 embeddings of a split (or of several) addressed by chunk id (memory-mapped)."""
    arrays, starts = [], []
    for f in layout.chunk_shard_files(db, split):
        path = layout.aligned_path(f, layout.EMBEDDINGS)
        if not os.path.exists(path):
            raise mf.DBNotReady(f"{path} is missing; run the embeddings stage (build-db resumes it)")
        array = np.load(path, mmap_mode="r")
        if len(array):
            arrays.append(array)
            starts.append(first_chunk_id(f))
    if not arrays:
        raise ValueError(f"{db}: no {split or 'any'} embeddings to index (the corpus produced no {split} chunks)")
    return ShardedRows(arrays, starts)


def index_shard_paths(db: str) -> list[str]:
    """The DB's index shards, then those of every added increment (``python -m pipeline add-documents``)."""
    return [p for root in mf.db_roots(db) for p in layout.index_shard_files(root)]


def merge_top_k(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of several (distances (n, c), ids (n, c)) results, nearest first, ties by id.

    Breaking ties by id makes the merge independent of the order of its inputs, so shards spread
    over any number of servers merge to the same answer as one process searching them all.
    """
    dists = np.concatenate([d for d, _ in results], axis=1)
    ids = np.concatenate([i for _, i in results], axis=1)
    dists = np.where(ids < 0, np.inf, dists)
    order = np.lexsort((ids, dists))[:, :k]  # by distance, then id
    dists, ids = np.take_along_axis(dists, order, 1), np.take_along_axis(ids, order, 1)
    ids = np.where(np.isfinite(dists), ids, -1)
    if dists.shape[1] < k:  # fewer candidates than k in all inputs together
        pad = k - dists.shape[1]
        dists = np.pad(dists, ((0, 0), (0, pad)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return dists.astype(np.float32), ids


def faiss_gpus() -> int:
    """GPUs faiss can use: 0 with the faiss-cpu build or without a CUDA device."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_device(requested: str = "auto") -> str:
    """'auto' is 'gpu' when faiss sees a GPU, else 'cpu'; asking for 'gpu' without one is an error."""
    if requested not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device {requested!r}: use auto, cpu or gpu")
    gpus = faiss_gpus()
    if requested == "gpu" and not gpus:
        raise ValueError(
            "device gpu: faiss sees no GPU (this is the faiss-cpu build, or no CUDA device is visible); use auto or cpu"
        )
    return "gpu" if gpus and requested != "cpu" else "cpu"


def drop_deleted(dists: np.ndarray, ids: np.ndarray, deleted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The candidates without deleted ids, nearest first, padded at the end: the filter for searches without a
    selector."""
    return merge_top_k([(dists, np.where(np.isin(ids, deleted), -1, ids))], ids.shape[1])


def deleted_selector(chunk_ids: np.ndarray):
    """A faiss selector that excludes deleted chunk ids inside the search (k results still come back)."""
    if not len(chunk_ids):
        return None
    return faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(chunk_ids, dtype=np.int64)))


# faiss precomputes an IVF-PQ table of nlist x M x 256 floats when an index is read (up to 2 GB by default),
# and every shard of a DB's index carries its own: IVF16384,PQ48 makes it 805 MB per shard, so 14 shards in
# each of two neighbour actors exhausted a 24 GB node. Past this size the distance tables are computed per
# probed list instead (the same distances).
PRECOMPUTED_TABLE_MAX_BYTES = 64 << 20
faiss.cvar.precomputed_table_max_bytes = PRECOMPUTED_TABLE_MAX_BYTES


class IndexShard:
    """One IVF-PQ index shard: approximate top-k by PQ distance. Ids are chunk ids; -1 where fewer exist."""

    def __init__(self, path: str, *, mmap: bool = False, gpu_resources=None):
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            self.index = faiss.read_index(path, flags)
        except RuntimeError as e:
            raise ValueError(
                f"index shard {path} is unreadable ({str(e).splitlines()[0]}); rebuild the index stage"
            ) from e
        self.path, self.dim, self.on_gpu = path, self.index.d, gpu_resources is not None
        if self.on_gpu:  # the codes move to GPU 0; the CPU copy is dropped
            self.index = faiss.index_cpu_to_gpu(gpu_resources, 0, self.index)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int, *, nprobe: int, selector=None) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) approximate distances, (n, k) ids; ``selector`` excludes deleted ids inside faiss (CPU only)."""
        if self.on_gpu:
            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
            return self.index.search(queries, k)
        return self.index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe, sel=selector))


DEFAULT_RERANK_FACTOR = 4  # the index stage's default; an index whose manifest predates the setting was built with it
FALLBACK_NPROBE = 8  # for an index whose manifest has no measured default_nprobe


def search_defaults(manifest: dict) -> tuple[int, int]:
    """(nprobe, rerank_factor) a built index is searched with unless a caller says otherwise: what the index
    stage chose (an index built before it chose the factor: the configured one)."""
    stage = manifest["stages"].get("index", {})
    configured = stage.get("config", {}).get("rerank_factor", DEFAULT_RERANK_FACTOR)
    return stage.get("default_nprobe") or FALLBACK_NPROBE, stage.get("default_rerank_factor", configured)


def shortlist_size(k: int, rerank_factor: int) -> int:
    """Approximate candidates asked of each shard (group) for a top k: ``k * rerank_factor`` (k without re-ranking)."""
    return k * max(1, rerank_factor)


def search_shards(
    shards: list[IndexShard], queries: np.ndarray, k: int, *, nprobe: int, selector=None
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top k over several shards, merged. (n, k) distances, (n, k) ids."""
    return merge_top_k([s.search(queries, k, nprobe=nprobe, selector=selector) for s in shards], k)


def load_indexed_vectors(db: str) -> ShardedRows:
    """The fp16 embeddings of the indexed chunks of the DB and its increments, memory-mapped: what re-ranking reads."""
    rows = [load_embedding_rows(root, layout.INDEXED_SPLITS) for root in mf.db_roots(db)]
    return ShardedRows([a for r in rows for a in r.arrays], [s for r in rows for s in r.starts])


RERANK_BLOCK_BYTES = 32 << 20  # what one block of re-ranking may allocate: a request at the API's limits stays bounded


def rerank(vectors: ShardedRows, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared L2 between queries (n, d) and their candidates' stored vectors; top k, ties by id.

    Queries go in blocks of at most ``RERANK_BLOCK_BYTES`` of (block, c, d) float32: 256 queries of
    400 candidates at 384-d would otherwise take 157 MB, twice."""
    n, c = ids.shape
    valid = ids >= 0
    if not valid.any():
        return np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int64)
    # Padding (-1) reads some stored row and is dropped by merge_top_k: one gather, no masked copies.
    gather = np.where(valid, ids, ids.max())
    block = max(1, RERANK_BLOCK_BYTES // max(1, c * queries.shape[1] * 4))
    parts = []
    for i in range(0, n, block):
        q, cand = queries[i : i + block], gather[i : i + block]
        diff = vectors.get(cand.ravel()).astype(np.float32).reshape(cand.shape + (q.shape[1],))  # (b, c, d)
        diff -= q[:, None, :]
        np.square(diff, out=diff)
        parts.append(merge_top_k([(diff.sum(-1), ids[i : i + block])], k))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


def top_k(
    vectors: ShardedRows, queries: np.ndarray, dists: np.ndarray, ids: np.ndarray, k: int, rerank_factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """The final top k of merged candidates (n, c): re-ranked exactly on the stored vectors, or as they are
    without re-ranking."""
    return rerank(vectors, queries, ids, k) if rerank_factor else (dists[:, :k], ids[:, :k])


class RetrievalIndex:
    """Searches every index shard for ``rerank_factor * k`` candidates, merges them and re-ranks
    them exactly on the stored vectors; deleted documents are excluded (inside faiss on the CPU).
    ``threads``: faiss's OpenMP threads for every search, whichever thread calls it (None: OpenMP's
    default of the calling thread, the node's cores unless OMP_NUM_THREADS says otherwise)."""

    def __init__(
        self,
        db: str,
        *,
        shard_paths: list[str] | None = None,
        nprobe: int | None = None,
        rerank_factor: int | None = None,
        threads: int | None = None,
        mmap: bool = False,
        device: str = "cpu",
    ):
        self.threads = threads
        default_nprobe, default_rerank = search_defaults(mf.read_manifest(db))
        paths = shard_paths or index_shard_paths(db)
        if not paths:
            raise mf.DBNotReady(
                f"{db}/{layout.INDEX} holds no index shards; run the index stage ({mf.BUILD_HINT.format(db=db)})"
            )
        self.device = resolve_device(device)
        resources = faiss.StandardGpuResources() if self.device == "gpu" else None
        self.shards = [IndexShard(p, mmap=mmap, gpu_resources=resources) for p in paths]
        self.dim = self.shards[0].dim
        self.vectors = load_indexed_vectors(db)
        self.nprobe = nprobe or default_nprobe
        self.rerank_factor = default_rerank if rerank_factor is None else rerank_factor
        self.deleted = deletions.deleted_chunk_ids(db)
        self.selector = deleted_selector(self.deleted) if self.device == "cpu" else None

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k chunk ids by squared L2. (n, k) distances, (n, k) ids."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}); got {queries.shape}")
        # OpenMP's count is per thread: a search from a thread pool would otherwise take the cores' count
        if self.threads:
            faiss.omp_set_num_threads(self.threads)
        dists, ids = search_shards(
            self.shards,
            queries,
            shortlist_size(k, self.rerank_factor),
            nprobe=nprobe or self.nprobe,
            selector=self.selector,
        )
        if self.device == "gpu" and len(self.deleted):
            dists, ids = drop_deleted(dists, ids, self.deleted)
        return top_k(self.vectors, queries, dists, ids, k, self.rerank_factor)
