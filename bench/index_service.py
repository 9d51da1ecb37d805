"""Load benchmark of the index service on loopback, against the same work done in process.

    python -m bench.index_service --db db [--clients 8] [--queries 400] [--seconds 60]

Closed loop: each of ``--clients`` threads sends one query (k=10) and waits for the answer, until
``--queries`` answers or ``--seconds`` pass. Text queries are decoded held-out chunks (the service
embeds them); embedding queries are their stored vectors (search only). The baseline runs the
same queries one at a time in this process: ``ChunkEmbedder.embed_texts`` + ``RetrievalIndex.search``.
Reports queries/s, p50 and p99 latency, and service/in-process throughput ratios.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import requests
from ray import serve

from index_service.app import ServiceConfig, build_app
from retro_db.embedder import ChunkEmbedder
from retro_db.layout import chunk_shard_files
from retro_db.ray_cluster import connect_ray
from retro_db.search import RetrievalIndex, load_embedding_rows
from retro_db.token_store import TokenStore, first_chunk_id
from retro_db.tokenizer import db_tokenizer

log = logging.getLogger("bench.index_service")


def held_out_queries(db: str, n: int) -> tuple[list[str], np.ndarray]:
    """Texts and stored embeddings of valid/test chunks (never in the index) that hold text."""
    ids = np.concatenate([first_chunk_id(f) + np.flatnonzero(pq.read_table(f, columns=["n_bytes"])["n_bytes"].to_numpy() > 0)
                          for s in ("valid", "test") for f in chunk_shard_files(db, s)])
    ids = np.sort(np.random.default_rng(0).choice(ids, size=min(n, len(ids)), replace=False))
    tokens, lengths = TokenStore(db).chunks(ids)
    texts = db_tokenizer(db).decode_batch([t[:m].tolist() for t, m in zip(tokens, lengths)])
    return texts, np.asarray(load_embedding_rows(db, None).get(ids), dtype=np.float32)


def latency_summary(latencies: list[float], seconds: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"queries": len(ms), "qps": len(ms) / seconds, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def closed_loop(call, queries: list, *, clients: int, max_queries: int, max_seconds: float) -> dict:
    """``clients`` threads each calling ``call(query)`` back to back; bounded in count and time."""
    latencies, lock, next_i = [], threading.Lock(), [0]
    deadline = time.perf_counter() + max_seconds

    def worker():
        while time.perf_counter() < deadline:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= max_queries:
                return
            t0 = time.perf_counter()
            call(queries[i % len(queries)])
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latency_summary(latencies, time.perf_counter() - t0)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=400, help="per measurement")
    parser.add_argument("--seconds", type=float, default=60.0, help="per measurement")
    parser.add_argument("--shard-groups", type=int, default=2)
    parser.add_argument("--embed-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    texts, vectors = held_out_queries(args.db, args.queries)
    n = min(args.queries, len(texts))

    # In process, one query at a time: the work the service does, without HTTP, Ray or batching.
    embedder, index = ChunkEmbedder(threads=os.cpu_count()), RetrievalIndex(args.db, threads=1)
    embedder.embed_texts(texts[:8])
    in_process = {
        "texts": closed_loop(lambda t: index.search(embedder.embed_texts([t]), 10), texts, clients=1, max_queries=n, max_seconds=args.seconds),
        "embeddings": closed_loop(lambda v: index.search(v[None], 10), list(vectors), clients=1, max_queries=n, max_seconds=args.seconds),
    }

    connect_ray()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServiceConfig(db=args.db, shard_groups=args.shard_groups, embed_threads=args.embed_threads)), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/search"
    local = threading.local()

    def post(body: dict) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        response = session.post(url, json=body, timeout=120)
        response.raise_for_status()

    post({"texts": texts[:8], "k": 10})  # warm-up
    service = {
        "texts": closed_loop(lambda t: post({"texts": [t], "k": 10}), texts, clients=args.clients, max_queries=n, max_seconds=args.seconds),
        "embeddings": closed_loop(lambda v: post({"embeddings": [v.tolist()], "k": 10}), list(vectors), clients=args.clients,
                                  max_queries=n, max_seconds=args.seconds),
    }
    serve.shutdown()

    print(f"index service on loopback, k=10, {args.clients} closed-loop clients, {args.shard_groups} shard groups; in process: 1 query at a time")
    print(f"{'queries':>10s} {'where':>11s} {'n':>5s} {'q/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'ratio':>6s}")
    for kind in ("texts", "embeddings"):
        for where, r in (("in process", in_process[kind]), ("service", service[kind])):
            ratio = r["qps"] / in_process[kind]["qps"]
            print(f"{kind:>10s} {where:>11s} {r['queries']:5d} {r['qps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
