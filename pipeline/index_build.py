"""Stage 3 (faiss): a sharded IVF-PQ index over the train chunks (and the retrieval-only ones).

One IVF-PQ index (``index_factory`` string, defaults scaled to the number of chunks) is trained
once on a sample; each train (and retrieval) embedding shard is added with its chunk ids to a copy of it, giving
``DB/index/<split>/shard-*.faissindex`` that a server can hold apart or together. ``retro_db.search``
searches them (with exact re-ranking); at build time ``pipeline.index_recall`` measures recall@10
and queries/s for a grid of nprobe values, and the smallest nprobe reaching the target recall
becomes the default. All of it goes to the manifest.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow.parquet as pq

from pipeline.index_recall import choose_search_defaults, exact_top_k, heldout_queries
from pipeline.stage import Stage, completed
from retro_db import layout
from retro_db import manifest as mf
from retro_db.search import DEFAULT_RERANK_FACTOR, RetrievalIndex, load_embedding_rows, resolve_device
from retro_db.token_store import first_chunk_id

log = logging.getLogger(__name__)


@dataclass
class IndexConfig:
    factory: str = field(default="", metadata={"help": "faiss index_factory string (default: IVF-PQ scaled to the DB)"})
    rerank_factor: int = field(
        default=DEFAULT_RERANK_FACTOR, metadata={"help": "exact re-ranking of k*factor candidates; 0 disables it"}
    )
    max_rerank_factor: int = field(
        default=32,
        metadata={"help": "where no nprobe reaches target_recall, the factor is doubled up to this"},
    )
    skip_textless_chunks: bool = field(
        default=True, metadata={"help": "leave chunks holding only <|endoftext|> out of the index"}
    )
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


def indexable_rows(chunk_file: str, skip_textless: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, d) float32, chunk ids (n,)) of a train shard's chunks that hold text.

    A document whose tokens fill its chunks exactly ends in a chunk holding only <|endoftext|>:
    no text, and the same embedding as every other such chunk. Those are never retrievable.
    """
    has_text = pq.read_table(chunk_file, columns=["n_bytes"])["n_bytes"].to_numpy() > 0
    has_text |= not skip_textless
    vectors = np.load(layout.aligned_path(chunk_file, layout.EMBEDDINGS), mmap_mode="r")
    ids = first_chunk_id(chunk_file) + np.arange(len(vectors), dtype=np.int64)
    return np.asarray(vectors[has_text], dtype=np.float32), ids[has_text]


def flat_index(d: int, device: str):
    """An exact L2 index for k-means assignment, on every GPU or on the CPU."""
    flat = faiss.IndexFlatL2(d)
    return faiss.index_cpu_to_all_gpus(flat) if device == "gpu" else flat


def train_index(index, sample: np.ndarray, device: str) -> None:
    """Trains an IVF(-PQ) index; the k-means of its coarse quantizer and of its PQ codebooks assign
    through flat indexes on ``device``. One code path for both devices: on the CPU the trained
    bytes equal faiss's default training (checked by a test), on a GPU the assignments, which are
    nearly all of k-means' cost, run there."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    pq = getattr(ivf, "pq", None)
    coarse = flat_index(ivf.d, device)  # held here: faiss keeps only a pointer
    sub = flat_index(pq.dsub, device) if pq is not None else None
    ivf.clustering_index = coarse
    if pq is not None:
        pq.assign_index = sub
    try:
        index.train(sample)
    finally:
        ivf.clustering_index = None
        if pq is not None:
            pq.assign_index = None


def write_index_shard(trained, chunk_file: str, path: str, *, skip_textless: bool = True) -> str:
    """Adds one train chunk shard's vectors to a copy of the trained (empty) index; writes it atomically."""
    shard = faiss.clone_index(trained)
    shard.add_with_ids(*indexable_rows(chunk_file, skip_textless))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    faiss.write_index(shard, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def write_index(
    db: str,
    *,
    config: IndexConfig | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    device: str = "auto",
) -> dict:
    """Runs stage 3: trains once (on a GPU when ``device`` resolves to one), writes one index shard
    per train embedding shard, measures recall."""
    config = config or IndexConfig()
    device = resolve_device(device)
    faiss.omp_set_num_threads(threads or os.cpu_count() or 1)
    embeddings = completed(db, "embeddings")
    rows = load_embedding_rows(db, layout.INDEXED_SPLITS)
    # ids need not be contiguous (retrieval follows test)
    n, d = sum(len(a) for a in rows.arrays), rows.arrays[0].shape[1]
    stage = Stage(
        db,
        "index",
        config,
        overwrite=overwrite,
        fingerprints={
            "factory": config.factory or default_factory(n, d, min_points_per_list=config.min_points_per_list),
            "embeddings_model_sha256": embeddings["config"]["model_sha256"],
            "embedding_shards": [s["sha256"] for s in embeddings["shards"]],
        },
    )
    factory = stage.record["factory"]
    indexed_files = layout.chunk_shard_files(db, layout.INDEXED_SPLITS)
    shard_paths = [layout.aligned_path(f, layout.INDEX) for f in indexed_files]
    if done := stage.finished(shard_paths):
        return done
    stage.start(wipe=[os.path.join(db, layout.INDEX)])
    for split in {layout.split_of(f) for f in indexed_files}:
        os.makedirs(os.path.join(db, layout.INDEX, split), exist_ok=True)

    trained_path = layout.trained_index_path(db)
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
        log.info("index: training %s on %d of %d vectors (%s)", factory, n_train, n, device)
        t0 = time.perf_counter()
        train_index(index, sample, device)
        train_s = time.perf_counter() - t0
        faiss.write_index(index, trained_path + ".tmp")
        os.replace(trained_path + ".tmp", trained_path)
        stage.update(train_seconds=round(train_s, 2), train_points=n_train, train_device=device)
    trained = faiss.read_index(trained_path)
    shards = []
    t0 = time.perf_counter()
    for f, path in zip(indexed_files, shard_paths):
        if not os.path.exists(path):
            write_index_shard(trained, f, path, skip_textless=config.skip_textless_chunks)
        shards.append(stage.shard(path, bytes=os.path.getsize(path)))
    add_s = time.perf_counter() - t0

    index = RetrievalIndex(db, shard_paths=shard_paths, rerank_factor=config.rerank_factor)
    t0 = time.perf_counter()
    queries = heldout_queries(db, config.recall_queries, config.seed)
    _, exact_ids, exact_qps = exact_top_k((indexable_rows(f) for f in indexed_files), queries, 10)
    choice = choose_search_defaults(index, queries, exact_ids, config.target_recall, config.max_rerank_factor)
    recall_s = time.perf_counter() - t0
    if choice["recall_at_10"] < config.target_recall:
        log.warning(
            "index: no nprobe reaches recall@10 %.2f with re-ranking up to x%d (best %.3f); defaulting to %d",
            config.target_recall,
            choice["default_rerank_factor"],
            choice["recall_at_10"],
            choice["default_nprobe"],
        )
    log.info(
        "index: %s, %d vectors in %d shards; recall@10 %.3f at default nprobe %d, re-ranking x%d",
        factory,
        index.ntotal,
        len(shards),
        choice["recall_at_10"],
        choice["default_nprobe"],
        choice["default_rerank_factor"],
    )
    return stage.complete(
        shards=shards,
        vectors=index.ntotal,
        dim=d,
        bytes=sum(s["bytes"] for s in shards),
        add_seconds=round(add_s, 2),
        recall_seconds=round(recall_s, 2),
        **choice,
        exact_qps=round(exact_qps, 1),
        recall_queries=len(queries),
        versions=mf.package_versions("faiss-cpu", "faiss-gpu", "numpy"),
    )
