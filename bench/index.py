"""Benchmark of stages 3-4 on a built DB: the IVF-PQ index against exact search, same queries.

Baseline: faiss ``IndexFlatL2`` brute force over every stored train vector. For each nprobe:
queries/s and recall@10 (10-recall@10 against that exact search) of the PQ codes alone and with
exact re-ranking, and the speed ratio to the brute force. Then the neighbour search as stage 4
runs it (k=2, same-document filtering) on the held-out queries.

    python -m bench.index [--db db] [--queries 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from pipeline.index_build import indexable_rows
from pipeline.index_recall import exact_top_k, heldout_queries, measure_recall
from pipeline.neighbours import neighbours_of
from retro_db.layout import chunk_shard_files
from retro_db.search import RetrievalIndex
from retro_db.token_store import TokenStore


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    index = RetrievalIndex(args.db, threads=args.threads)
    queries = heldout_queries(args.db, args.queries, seed=7)
    _, exact_ids, exact_qps = exact_top_k((indexable_rows(f) for f in chunk_shard_files(args.db, "train")), queries, 10)
    print(
        f"{index.ntotal} vectors, {len(queries)} held-out queries, {args.threads} threads; "
        f"exact IndexFlatL2: {exact_qps:,.0f} queries/s"
    )
    print(
        f"{'nprobe':>6s} {'recall@10 PQ':>13s} {'q/s PQ':>9s} "
        f"{'recall@10 +rerank':>18s} {'q/s +rerank':>12s} {'x exact':>8s}"
    )
    for row in measure_recall(index, queries, exact_ids):
        print(
            f"{row['nprobe']:6d} {row['recall@10_pq']:13.3f} {row['qps_pq']:9,.0f} {row['recall@10_reranked']:18.3f} "
            f"{row['qps_reranked']:12,.0f} {row['qps_reranked'] / exact_qps:8.2f}"
        )
    store = TokenStore(args.db)
    t0 = time.perf_counter()
    ids, _ = neighbours_of(
        index, queries, np.full(len(queries), -1), store.doc_of, k=2, candidates=32, max_candidates=1024
    )
    seconds = time.perf_counter() - t0
    print(
        f"neighbour search (k=2, K=32, nprobe {index.nprobe}, same-document filter): "
        f"{len(queries) / seconds:,.0f} queries/s, "
        f"{(ids >= 0).all(axis=1).mean():.3f} with k neighbours"
    )


if __name__ == "__main__":
    main()
