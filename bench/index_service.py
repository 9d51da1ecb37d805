"""Load benchmark of the index service on loopback, side by side in one run with the same work done
in one process and with no-op Serve apps of the service's hop structure (the framework's floor).

    python -m bench.index_service --db db [--seconds 10] [--clients 1 8] [--sizes 1 64] [--out FILE]

Closed loop: each client thread sends one request (k=10) and waits for the answer. A request holds
``size`` queries: held-out valid/test chunks (never in the index), as decoded text (the service
embeds them) or as their stored vectors (search only); q/s counts queries, not requests. Bodies are
encoded before the clock starts, so the load generator's cost is the same for every row.

- in process: ``ChunkEmbedder.embed_texts`` + ``RetrievalIndex.search`` on the same requests, all
  cores to torch and faiss; with 1 client this is one-at-a-time (size 1) or batched (size 64)
  in-process work.
- service i: ``index_service.app`` with the i-th ``--services`` config, one after the other (by
  default: the default ``ServiceConfig`` (2 ingress replicas); 1 ingress replica searching on 2 threads;
  2 remote shard groups).
- floor, N hops: a FastAPI ingress on Serve that takes the same body and answers with a response the
  service gave to a request of the same size, after N - 1 sequential calls to a no-op deployment
  (N = 1: the ingress alone; N = 2: proxy -> ingress -> one inner deployment; N = 3: a text
  query's path through a remote shard group, embedder then searcher), with as many ingress replicas
  as the first service.
"""

import argparse
import json
import logging
import os
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import requests
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from index_service.app import ServiceConfig, build_app, free_port, haproxy_env
from retro_db.embedder import ChunkEmbedder
from retro_db.layout import chunk_shard_files
from retro_db.ray_cluster import connect_ray
from retro_db.search import RetrievalIndex, load_embedding_rows
from retro_db.token_store import TokenStore, first_chunk_id
from retro_db.tokenizer import db_tokenizer

log = logging.getLogger("bench.index_service")
K = 10


def held_out_queries(db: str, n: int) -> tuple[list[str], np.ndarray]:
    """Texts and stored embeddings of valid/test chunks (never in the index) that hold text."""
    ids = np.concatenate(
        [
            first_chunk_id(f) + np.flatnonzero(pq.read_table(f, columns=["n_bytes"])["n_bytes"].to_numpy() > 0)
            for s in ("valid", "test")
            for f in chunk_shard_files(db, s)
        ]
    )
    ids = np.sort(np.random.default_rng(0).choice(ids, size=min(n, len(ids)), replace=False))
    tokens, lengths = TokenStore(db).chunks(ids)
    texts = db_tokenizer(db).decode_batch([t[:m].tolist() for t, m in zip(tokens, lengths)])
    return texts, np.asarray(load_embedding_rows(db, None).get(ids), dtype=np.float32)


def requests_of(items: list, size: int, count: int) -> list[list]:
    """``count`` requests of ``size`` consecutive items, wrapping around."""
    return [[items[(r * size + j) % len(items)] for j in range(size)] for r in range(count)]


def latency_summary(latencies: list[float], seconds: float, size: int) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "requests": len(ms),
        "qps": len(ms) * size / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def closed_loop(call, work: list, *, clients: int, size: int, seconds: float) -> dict:
    """``clients`` threads each calling ``call(work[i])`` back to back for ``seconds``."""
    latencies, lock, next_i = [], threading.Lock(), [0]
    deadline = time.perf_counter() + seconds

    def worker():
        while time.perf_counter() < deadline:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            t0 = time.perf_counter()
            call(work[i % len(work)])
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latency_summary(latencies, time.perf_counter() - t0, size)


# -- the floor: the service's hop structure with no work -----------------------------------------

floor_api = FastAPI()


@serve.deployment(max_ongoing_requests=64)
class NoOp:
    async def __call__(self, body: bytes) -> bytes:
        return b""


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(floor_api)
class FloorIngress:
    def __init__(self, response: bytes, *inner):
        self.response, self.inner = response, inner

    @floor_api.post("/v1/search")
    async def search(self, request: Request) -> Response:
        body = await request.body()
        for hop in self.inner:
            await hop.remote(body)
        return Response(self.response, media_type="application/json")


def floor_app(response: bytes, hops: int, ingress_replicas: int):
    # Ray's CPU reservations only place actors, they do not limit them: tiny ones always fit.
    inner = [NoOp.options(name=f"NoOp-{i}", ray_actor_options={"num_cpus": 0.01}).bind() for i in range(hops - 1)]
    return FloorIngress.options(num_replicas=ingress_replicas, ray_actor_options={"num_cpus": 0.01}).bind(
        response, *inner
    )


# -- the run ---------------------------------------------------------------------------------------


def http_caller(url: str):
    local = threading.local()

    def post(body: bytes) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=120)
        response.raise_for_status()

    return post


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64], help="queries per request")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--kinds", nargs="+", default=["texts", "embeddings"], choices=["texts", "embeddings"])
    parser.add_argument(
        "--services",
        nargs="+",
        default=[
            "{}",
            '{"ingress_replicas": 1, "search_threads": 2}',
            '{"shard_groups": 2, "embed_cpus": 1, "embed_threads": 2}',
        ],
        help="ServiceConfig fields as JSON, one service per argument",
    )
    parser.add_argument("--floors", type=int, nargs="*", default=[1, 2, 3], help="hop counts of the no-op floor apps")
    parser.add_argument("--skip-in-process", action="store_true", help="tuning runs only: no baseline, so no ratios")
    parser.add_argument(
        "--haproxy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Serve's HAProxy ingress for every service and floor, as `make serve` runs it "
        "(--no-haproxy: Serve's Python proxy)",
    )
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    configs = [ServiceConfig(**{"db": args.db, **json.loads(c)}) for c in args.services]

    texts, vectors = held_out_queries(args.db, 512)
    items = {"texts": texts, "embeddings": list(vectors)}
    rows = []

    def record(kind, size, clients, where, result):
        rows.append({"kind": kind, "size": size, "clients": clients, "where": where, **result})
        log.info(
            "%s x%d, %d clients, %s: %.1f q/s, p50 %.1f ms, p99 %.1f ms",
            kind,
            size,
            clients,
            where,
            result["qps"],
            result["p50_ms"],
            result["p99_ms"],
        )

    # In process: the work the service does, without HTTP, Ray or cross-request batching.
    embedder, index = ChunkEmbedder(threads=os.cpu_count()), RetrievalIndex(args.db, threads=os.cpu_count())
    embedder.embed_texts(texts[:64])
    in_process = {
        "texts": lambda batch: index.search(embedder.embed_texts(batch), K),
        "embeddings": lambda batch: index.search(np.stack(batch), K),
    }
    for kind in args.kinds if not args.skip_in_process else []:
        for size in args.sizes:
            for clients in args.clients:
                work = requests_of(items[kind], size, 256)
                record(
                    kind,
                    size,
                    clients,
                    "in process",
                    closed_loop(in_process[kind], work, clients=clients, size=size, seconds=args.seconds),
                )

    if args.haproxy:
        os.environ.update(haproxy_env())  # before Ray starts: its processes read them
    connect_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"

    def bodies(kind: str, size: int) -> list[bytes]:
        encode = (lambda q: q) if kind == "texts" else (lambda q: q.tolist())
        return [
            json.dumps({kind: [encode(q) for q in batch], "k": K}).encode()
            for batch in requests_of(items[kind], size, 256)
        ]

    def measure(where: str, url: str, sizes: list[int]) -> None:
        for kind in args.kinds:
            for size in sizes:
                work = bodies(kind, size)
                for clients in args.clients:
                    record(
                        kind,
                        size,
                        clients,
                        where,
                        closed_loop(http_caller(url), work, clients=clients, size=size, seconds=args.seconds),
                    )

    responses = {}  # a real answer per request size: what the floor sends back
    for i, cfg in enumerate(configs):
        serve.run(build_app(cfg), name=f"service{i}", route_prefix="/")
        for size in args.sizes:
            response = requests.post(
                f"{base}/v1/search",
                data=bodies("texts", size)[0],
                headers={"Content-Type": "application/json"},
                timeout=300,
            )
            response.raise_for_status()  # also the warm-up
            responses[size] = response.content
        measure(f"service {i}", f"{base}/v1/search", args.sizes)
        serve.delete(f"service{i}")
    for hops in args.floors:
        for size in args.sizes:
            serve.run(
                floor_app(responses[size], hops, configs[0].ingress_replicas),
                name=f"floor{hops}",
                route_prefix=f"/floor{hops}",
            )
            measure(f"floor {hops} hops", f"{base}/floor{hops}/v1/search", [size])
            serve.delete(f"floor{hops}")
    serve.shutdown()

    print(f"\nindex service on loopback, k={K}")
    for i, cfg in enumerate(configs):
        print(f"service {i}: {cfg.model_dump(exclude={'db'})}")
    print(
        f"{'queries':>10s} {'size':>4s} {'clients':>7s} {'where':>13s} {'q/s':>8s} "
        f"{'p50 ms':>8s} {'p99 ms':>8s} {'/in proc':>8s} "
        f"{'/floor 1':>8s} {'/floor 2':>8s}"
    )
    by = {(r["kind"], r["size"], r["clients"], r["where"]): r for r in rows}
    for r in rows:
        base_row = by.get((r["kind"], r["size"], 1, "in process"))
        r["vs_in_process_1_client"] = r["qps"] / base_row["qps"] if base_row else None
        for hops in (1, 2):
            floor = by.get((r["kind"], r["size"], r["clients"], f"floor {hops} hops"))
            r[f"vs_floor_{hops}_hops"] = r["qps"] / floor["qps"] if floor else None
        ratios = " ".join(
            f"{r[key] if r[key] is not None else float('nan'):8.2f}"
            for key in ("vs_in_process_1_client", "vs_floor_1_hops", "vs_floor_2_hops")
        )
        print(
            f"{r['kind']:>10s} {r['size']:4d} {r['clients']:7d} {r['where']:>13s} "
            f"{r['qps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {ratios}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"services": [c.model_dump() for c in configs], "k": K, "seconds": args.seconds, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
