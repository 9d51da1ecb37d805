"""Stage 3 (faiss): a sharded IVF-PQ index over the train chunks, with exact re-ranking.

One IVF-PQ index (``index_factory`` string, defaults scaled to the number of chunks) is trained
once on a sample; each train embedding shard is added with its chunk ids to a copy of it, giving
``DB/index/train/shard-*.faissindex`` that a server can hold apart or together.

Searching (``RetrievalIndex``) asks every shard for ``rerank_factor * k`` candidates, merges them
and re-ranks them by exact squared L2 on the fp16 embeddings memory-mapped from ``DB/embeddings``:
plain PQ codes plateau near 0.7 recall@10 on 384-d text embeddings; the re-ranking stage (what
faiss ``IndexRefine`` and SCaNN do) lifts it above 0.9 without holding the vectors in RAM. Every
merge orders by (distance, id) (``merge_top_k``), so one process and shards spread over many
servers (``index_service``) give the same answer.

At build time recall@10 (10-recall@10 against exact search over the same stored vectors, on
held-out valid/test chunks) and queries/s are measured for a grid of nprobe values; the smallest
nprobe reaching the target recall becomes the default. All of it goes to the manifest.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.token_store import ShardedRows, chunk_shard_files, derived_path, first_chunk_id

log = logging.getLogger(__name__)

NPROBE_GRID = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class IndexConfig:
    factory: str = ""  # empty: IVF{nlist},PQ{d/8}x8np scaled to the DB
    rerank_factor: int = 4  # candidates per result re-ranked exactly; 0 disables re-ranking
    skip_textless_chunks: bool = True  # chunks holding only <|endoftext|> are not indexed
    min_points_per_list: int = 39
    max_points_per_list: int = 256
    target_recall: float = 0.9
    recall_queries: int = 1000
    seed: int = 1234


HNSW_QUANTIZER_MIN_LISTS = 1 << 16


def default_factory(n: int, d: int, *, min_points_per_list: int = 39) -> str:
    """IVF lists ~ 4 sqrt(n) (a power of two, each with >= min_points_per_list training points),
    PQ with d/8 one-byte subquantizers (48 bytes at d=384), no polysemous training (8x slower
    to train, unused here). From 2^16 lists (n >= 2^28) the coarse quantizer is an HNSW graph:
    a flat one costs nlist * d flops to assign each added vector and each query, which at 2^20
    lists exceeds the PQ scan itself (docs/SCALING.md)."""
    nlist = 2 ** max(0, int(math.log2(max(1.0, 4 * math.sqrt(n)))))
    while nlist > 1 and nlist * min_points_per_list > n:
        nlist //= 2
    m = next(m for m in (d // 8, d // 4, d // 2, d) if m and d % m == 0)
    quantizer = "_HNSW32" if nlist >= HNSW_QUANTIZER_MIN_LISTS else ""
    return f"IVF{nlist}{quantizer},PQ{m}x8np"


def load_embedding_rows(db: str, split: str | None = "train") -> ShardedRows:
    """fp16 embeddings of a split addressed by chunk id (memory-mapped)."""
    arrays, starts = [], []
    for f in chunk_shard_files(db, split):
        path = derived_path(f, "embeddings", ".npy")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing; run the embeddings stage (build-db resumes it)")
        array = np.load(path, mmap_mode="r")
        if len(array):
            arrays.append(array)
            starts.append(first_chunk_id(f))
    if not arrays:
        raise ValueError(f"{db}: no {split or 'any'} embeddings to index (the corpus produced no {split} chunks)")
    return ShardedRows(arrays, starts)


def indexable_rows(chunk_file: str, skip_textless: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, d) float32, chunk ids (n,)) of a train shard's chunks that hold text.

    A document whose tokens fill its chunks exactly ends in a chunk holding only <|endoftext|>:
    no text, and the same embedding as every other such chunk. Those are never retrievable.
    """
    import pyarrow.parquet as pq

    has_text = pq.read_table(chunk_file, columns=["n_bytes"])["n_bytes"].to_numpy() > 0
    has_text |= not skip_textless
    vectors = np.load(derived_path(chunk_file, "embeddings", ".npy"), mmap_mode="r")
    ids = first_chunk_id(chunk_file) + np.arange(len(vectors), dtype=np.int64)
    return np.asarray(vectors[has_text], dtype=np.float32), ids[has_text]


def index_shard_paths(db: str) -> list[str]:
    """The DB's index shards, then those of every added increment (``python -m pipeline add-documents``)."""
    from pipeline import manifest as mf

    roots = mf.db_roots(db)
    return [p for root in roots for p in sorted(glob.glob(os.path.join(root, "index", "train", "shard-*.faissindex")))]


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


def deleted_selector(chunk_ids: np.ndarray):
    """A faiss selector that excludes deleted chunk ids inside the search (k results still come back)."""
    import faiss

    if not len(chunk_ids):
        return None
    return faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(chunk_ids, dtype=np.int64)))


class IndexShard:
    """One IVF-PQ index shard: approximate top-k by PQ distance. Ids are chunk ids; -1 where fewer exist."""

    def __init__(self, path: str, *, mmap: bool = False):
        import faiss

        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            self.index = faiss.read_index(path, flags)
        except RuntimeError as e:
            raise ValueError(f"index shard {path} is unreadable ({str(e).splitlines()[0]}); rebuild the index stage") from e
        self.path, self.dim = path, self.index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int, *, nprobe: int, selector=None) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) approximate distances, (n, k) ids; ``selector`` excludes deleted ids inside faiss."""
        import faiss

        return self.index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe, sel=selector))


def search_shards(shards: list[IndexShard], queries: np.ndarray, k: int, *, nprobe: int, selector=None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top k over several shards, merged. (n, k) distances, (n, k) ids."""
    return merge_top_k([s.search(queries, k, nprobe=nprobe, selector=selector) for s in shards], k)


def load_indexed_vectors(db: str) -> ShardedRows:
    """The fp16 train embeddings of the DB and its increments, memory-mapped: what re-ranking reads."""
    from pipeline import manifest as mf

    rows = [load_embedding_rows(root, "train") for root in mf.db_roots(db)]
    return ShardedRows([a for r in rows for a in r.arrays], [s for r in rows for s in r.starts])


def rerank(vectors: ShardedRows, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared L2 between queries (n, d) and their candidates' stored vectors; top k, ties by id."""
    valid = ids >= 0
    stored = np.zeros(ids.shape + (queries.shape[1],), dtype=np.float32)  # (n, c, d)
    if valid.any():
        stored[valid] = vectors.get(ids[valid])
    return merge_top_k([(((stored - queries[:, None, :]) ** 2).sum(-1), ids)], k)


class RetrievalIndex:
    """Searches every index shard for ``rerank_factor * k`` candidates, merges them and re-ranks
    them exactly on the stored vectors.

    Deleted documents (``DB/deleted``, written by the index service) are excluded inside faiss.
    Axes: n queries, k results, d embedding dim. Ids are chunk ids; -1 where fewer exist.
    """

    def __init__(self, db: str, *, shard_paths: list[str] | None = None, nprobe: int | None = None,
                 rerank_factor: int | None = None, threads: int | None = None, mmap: bool = False):
        import faiss

        from pipeline import deletions
        from pipeline import manifest as mf

        if threads:
            faiss.omp_set_num_threads(threads)
        stage = mf.read_manifest(db)["stages"].get("index", {})
        paths = shard_paths or index_shard_paths(db)
        if not paths:
            raise FileNotFoundError(f"{db}/index holds no index shards; run the index stage")
        self.shards = [IndexShard(p, mmap=mmap) for p in paths]
        self.dim = self.shards[0].dim
        self.vectors = load_indexed_vectors(db)
        self.nprobe = nprobe or stage.get("default_nprobe") or 8
        self.rerank_factor = stage.get("config", {}).get("rerank_factor", 4) if rerank_factor is None else rerank_factor
        self.selector = deleted_selector(deletions.deleted_chunk_ids(db))

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k chunk ids by squared L2. (n, k) distances, (n, k) ids."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}); got {queries.shape}")
        candidates = k * max(1, self.rerank_factor)
        dists, ids = search_shards(self.shards, queries, candidates, nprobe=nprobe or self.nprobe, selector=self.selector)
        return rerank(self.vectors, queries, ids, k) if self.rerank_factor else (dists[:, :k], ids[:, :k])


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """k-recall@k: the share of the exact top k found in the returned top k."""
    k = exact.shape[1]
    return float(np.mean([len(np.intersect1d(f[f >= 0], e)) / k for f, e in zip(found, exact)]))


def heldout_queries(db: str, n: int, seed: int) -> np.ndarray:
    """Embeddings of valid/test chunks (never in the index); train chunks if there are none."""
    try:
        rows = [load_embedding_rows(db, s) for s in ("valid", "test") if chunk_shard_files(db, s)]
        pool = np.concatenate([a for r in rows for a in r.arrays]) if rows else None
    except ValueError:
        pool = None
    if pool is None or not len(pool):
        pool = np.concatenate(load_embedding_rows(db, "train").arrays)
    rng = np.random.default_rng(seed)
    return np.asarray(pool[np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))], dtype=np.float32)


def measure_recall(index: RetrievalIndex, queries: np.ndarray, exact_ids: np.ndarray, k: int = 10, grid=NPROBE_GRID) -> list[dict]:
    """recall@k and queries/s per nprobe, with and without re-ranking."""
    rows = []
    factor = index.rerank_factor
    for nprobe in grid:
        entry = {"nprobe": nprobe}
        for name, rf in (("pq", 0), ("reranked", factor)):
            if name == "reranked" and not factor:
                continue
            index.rerank_factor = rf
            t0 = time.perf_counter()
            _, ids = index.search(queries, k, nprobe=nprobe)
            seconds = time.perf_counter() - t0
            entry[f"recall@{k}_{name}"] = round(recall_at_k(ids, exact_ids), 4)
            entry[f"qps_{name}"] = round(len(queries) / seconds, 1)
        rows.append(entry)
    index.rerank_factor = factor
    return rows


def exact_top_k(db: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Brute force over every indexed train vector (IndexFlatL2); returns (D, I, queries/s)."""
    import faiss

    shards = [indexable_rows(f) for f in chunk_shard_files(db, "train")]
    flat = faiss.IndexIDMap2(faiss.IndexFlatL2(shards[0][0].shape[1]))
    for vectors, ids in shards:
        flat.add_with_ids(vectors, ids)
    t0 = time.perf_counter()
    dists, ids = flat.search(queries, k)
    return dists, ids, len(queries) / (time.perf_counter() - t0)


def write_index_shard(trained, chunk_file: str, path: str, *, skip_textless: bool = True) -> str:
    """Adds one train chunk shard's vectors to a copy of the trained (empty) index; writes it atomically."""
    import faiss

    shard = faiss.clone_index(trained)
    shard.add_with_ids(*indexable_rows(chunk_file, skip_textless))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    faiss.write_index(shard, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def write_index(db: str, *, config: IndexConfig | None = None, threads: int | None = None, overwrite: bool = False) -> dict:
    """Runs stage 3: trains once, writes one index shard per train embedding shard, measures recall."""
    import faiss

    from pipeline import manifest as mf

    config = config or IndexConfig()
    faiss.omp_set_num_threads(threads or os.cpu_count() or 1)
    emb_stage = mf.read_manifest(db)["stages"].get("embeddings")
    if not emb_stage or emb_stage.get("status") != "complete":
        raise FileNotFoundError(f"{db}: the embeddings stage is not complete; run it first")
    rows = load_embedding_rows(db, "train")
    n, d = len(rows), rows.arrays[0].shape[1]
    factory = config.factory or default_factory(n, d, min_points_per_list=config.min_points_per_list)
    record = {**asdict(config), "factory": factory, "embeddings_model_sha256": emb_stage["config"]["model_sha256"],
              "embedding_shards": [s["sha256"] for s in emb_stage["shards"]]}
    state = mf.stage_state(db, "index", record, overwrite=overwrite)
    train_files = chunk_shard_files(db, "train")
    out_dir = os.path.join(db, "index", "train")
    shard_paths = [os.path.join(out_dir, os.path.basename(f).replace(".parquet", ".faissindex")) for f in train_files]
    if state == "complete" and all(os.path.exists(p) for p in shard_paths):
        log.info("index: complete with the same config, skipping")
        return mf.read_manifest(db)["stages"]["index"]
    if state == "new":
        import shutil

        shutil.rmtree(os.path.join(db, "index"), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    mf.update_stage(db, "index", config=record, status="running")

    trained_path = os.path.join(db, "index", "trained.faissindex")
    if not os.path.exists(trained_path):
        index = faiss.index_factory(d, factory, faiss.METRIC_L2)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        nlist = ivf.nlist
        if hasattr(ivf, "pq"):
            # Below 39 points per PQ centroid faiss warns once per subquantizer; on a small DB the
            # codes then come out near-exact for the indexed vectors, which is what we want.
            ivf.pq.cp.min_points_per_centroid = 1
        n_train = min(n, nlist * config.max_points_per_list)
        all_ids = np.concatenate([np.arange(a, b) for a, b in zip(rows.starts, rows.ends)])
        picked = np.sort(np.random.default_rng(config.seed).choice(all_ids, size=n_train, replace=False))
        sample = np.asarray(rows.get(picked), dtype=np.float32)
        log.info("index: training %s on %d of %d vectors", factory, n_train, n)
        t0 = time.perf_counter()
        index.train(sample)
        train_s = time.perf_counter() - t0
        faiss.write_index(index, trained_path + ".tmp")
        os.replace(trained_path + ".tmp", trained_path)
        mf.update_stage(db, "index", train_seconds=round(train_s, 2), train_points=n_train)
    trained = faiss.read_index(trained_path)
    shards = []
    t0 = time.perf_counter()
    for f, path in zip(train_files, shard_paths):
        if not os.path.exists(path):
            write_index_shard(trained, f, path, skip_textless=config.skip_textless_chunks)
        shards.append({"path": os.path.relpath(path, db), "bytes": os.path.getsize(path), "sha256": mf.sha256_file(path), "status": "complete"})
    add_s = time.perf_counter() - t0

    index = RetrievalIndex(db, shard_paths=shard_paths, rerank_factor=config.rerank_factor)
    t0 = time.perf_counter()
    queries = heldout_queries(db, config.recall_queries, config.seed)
    _, exact_ids, exact_qps = exact_top_k(db, queries, 10)
    grid = measure_recall(index, queries, exact_ids)
    key = "recall@10_reranked" if config.rerank_factor else "recall@10_pq"
    good = [g["nprobe"] for g in grid if g[key] >= config.target_recall]
    default_nprobe = good[0] if good else grid[-1]["nprobe"]
    if not good:
        log.warning("index: no nprobe reaches recall@10 %.2f (best %.3f); defaulting to %d", config.target_recall, max(g[key] for g in grid), default_nprobe)
    recall = next(g[key] for g in grid if g["nprobe"] == default_nprobe)
    recall_s = time.perf_counter() - t0
    log.info("index: %s, %d vectors in %d shards; recall@10 %.3f at default nprobe %d", factory, index.ntotal, len(shards), recall, default_nprobe)
    return mf.update_stage(
        db, "index", config=record, status="complete", shards=shards, vectors=index.ntotal, dim=d,
        bytes=sum(s["bytes"] for s in shards), add_seconds=round(add_s, 2), recall_seconds=round(recall_s, 2), default_nprobe=default_nprobe,
        recall_at_10=recall, recall_grid=grid, exact_qps=round(exact_qps, 1), recall_queries=len(queries),
        versions=mf.package_versions("faiss-cpu", "faiss-gpu", "numpy"),
    )
