"""Recall of a DB's index, measured at build time against exact search over the same stored vectors.

recall@10 is 10-recall@10 (the share of the exact top 10 found in the returned top 10) on held-out
valid/test chunks, never in the index; it and queries/s are measured for a grid of nprobe values,
with and without exact re-ranking. The index stage records the grid and picks its default nprobe and
re-ranking depth (``choose_search_defaults``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import faiss
import numpy as np

from retro_db import layout
from retro_db.search import RetrievalIndex, load_embedding_rows, merge_top_k

NPROBE_GRID = (1, 2, 4, 8, 16, 32, 64, 128)
PLATEAU = 0.005  # recall@10 this close to the best is the same: the smaller nprobe is taken


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """k-recall@k: the share of the exact top k found in the returned top k."""
    k = exact.shape[1]
    return float(np.mean([len(np.intersect1d(f[f >= 0], e)) / k for f, e in zip(found, exact)]))


def heldout_queries(db: str, n: int, seed: int) -> np.ndarray:
    """Embeddings of valid/test chunks (never in the index); train chunks if there are none."""
    try:
        rows = [load_embedding_rows(db, s) for s in ("valid", "test") if layout.chunk_shard_files(db, s)]
        pool = np.concatenate([a for r in rows for a in r.arrays]) if rows else None
    except ValueError:
        pool = None
    if pool is None or not len(pool):
        pool = np.concatenate(load_embedding_rows(db, layout.INDEXED_SPLITS).arrays)
    rng = np.random.default_rng(seed)
    return np.asarray(pool[np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))], dtype=np.float32)


def measure_recall(
    index: RetrievalIndex, queries: np.ndarray, exact_ids: np.ndarray, k: int = 10, grid=NPROBE_GRID, pq: bool = True
) -> list[dict]:
    """recall@k and queries/s per nprobe, with re-ranking and (``pq``) without."""
    rows = []
    factor = index.rerank_factor
    for nprobe in grid:
        entry = {"nprobe": nprobe}
        for name, rf in (("pq", 0), ("reranked", factor)):
            if (name == "reranked" and not factor) or (name == "pq" and factor and not pq):
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


def choose_search_defaults(
    index: RetrievalIndex, queries: np.ndarray, exact_ids: np.ndarray, target: float, max_rerank_factor: int
) -> dict:
    """The index's search defaults: the smallest nprobe whose recall@10 reaches ``target`` at the index's
    re-ranking factor; where none does, the factor doubled (up to ``max_rerank_factor``) and the grid measured
    again (PQ's errors, not the lists probed, can bound recall: past a few lists probing more finds the same
    approximate top k*factor, and only a deeper re-ranked shortlist holds the exact top k). Without any that
    reaches it, the smallest nprobe within ``PLATEAU`` of the best recall at the deepest factor measured. Returns
    default_nprobe, default_rerank_factor, recall_at_10 and every grid measured (each row with its factor)."""
    factor, grid = index.rerank_factor, []
    key = "recall@10_reranked" if factor else "recall@10_pq"
    while True:
        index.rerank_factor = factor
        first = not grid  # PQ alone does not depend on the factor: measured once
        rows = [{"rerank_factor": factor, **row} for row in measure_recall(index, queries, exact_ids, pq=first)]
        grid += rows
        good = [r for r in rows if r[key] >= target]
        best = good[0] if good else next(r for r in rows if r[key] >= max(r[key] for r in rows) - PLATEAU)
        if good or not factor or factor * 2 > max_rerank_factor:
            break
        factor *= 2
    index.rerank_factor = best["rerank_factor"]
    return {
        "default_nprobe": best["nprobe"],
        "default_rerank_factor": best["rerank_factor"],
        "recall_at_10": best[key],
        "recall_grid": grid,
    }


def exact_top_k(
    shards: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Brute force (IndexFlatL2) over every indexed vector, given per shard as (vectors (n, d), chunk ids (n,));
    returns (D, I, queries/s). Shards are searched one at a time and merged (``merge_top_k``): given as a
    generator, only one shard's float32 vectors are in memory, whatever the index's size."""
    results, seconds = [], 0.0
    for vectors, ids in shards:
        if not len(vectors):
            continue
        flat = faiss.IndexFlatL2(vectors.shape[1])
        flat.add(vectors)
        t0 = time.perf_counter()
        dists, rows = flat.search(queries, min(k, len(vectors)))
        seconds += time.perf_counter() - t0
        results.append((dists, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)))
        del flat, vectors, ids  # before the generator makes the next shard
    dists, ids = merge_top_k(results, k)
    return dists, ids, len(queries) / seconds
