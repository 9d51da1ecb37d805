"""Stages 3 and 4 at 10M vectors: the index and neighbour stages' own code on a stand-in DB.

    make bench-index-scale    # = python -m bench.index_scale --db db --out bench/out/index-scale

Real embeddings of 10M chunks are out of reach of a CPU (~50 chunks/s with MiniLM), so the vectors
are a **stand-in**, and every figure made with them says so: each is drawn around the real MiniLM
embeddings of a built DB (``--db``): ``(1 - t) e_i + t e_j + noise`` for two random real
embeddings, ``t ~ U(0, 0.5)``, and isotropic Gaussian noise whose norm is half the median distance
between a real embedding and its nearest real neighbour. They fill the space between real text
embeddings (not a few tight clusters, which would flatter IVF); what they do not have is real
text's long-range structure, so recall on real embeddings at this size may differ.

The stand-in DB has the layout the stages read (chunk shards with ``chunk_id``/``doc_id``/``n_bytes``,
token shards for document ids, fp16 embedding shards, manifest records for the chunk and embedding
stages): ``--train`` chunks in train shards (the neighbour tables' queries), 5,000 each in valid and
test (the recall queries, never indexed), and the rest in the split "retrieval" (indexed, never a
query), as when the retrieval DB is larger than the training set. Documents are runs of
``CHUNKS_PER_DOC`` chunks. Then, each in its own process (peak RSS read from the process and its Ray
actors):

    python -m pipeline index --db D --index-factory IVF16384_HNSW32,PQ48x8np --max-points-per-list 39
    python -m pipeline neighbours --db D --overwrite [--nprobe N]

and reports time per step (training, adding, recall measurement, neighbour search), index bytes,
recall@10 and queries/s per nprobe against exact search on 1,000 held-out queries (the stage's own
measurement, exact search streamed shard by shard, with the re-ranking depths it tried before one
reached its target recall), and peak memory per process. A rerun skips what is complete (the stand-in DB,
the index).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time

import faiss
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bench.process_memory import PeakRss
from retro_db import layout
from retro_db import manifest as mf
from retro_db.search import load_embedding_rows, search_defaults
from retro_db.storage import sha256_file

log = logging.getLogger("bench.index_scale")

CHUNKS_PER_DOC = 8
SHARD_ROWS = 1_000_000
QUERY_SHARD_ROWS = 25_000  # the neighbour stage gives each actor whole shards: several keep both busy
HELD_OUT_ROWS = 5_000
FACTORY = "IVF16384_HNSW32,PQ48x8np"


def real_embeddings(db: str) -> np.ndarray:
    """Every embedding of a built DB, float32. (n, d)"""
    return np.concatenate(load_embedding_rows(db, None).arrays).astype(np.float32)


def noise_norm(real: np.ndarray) -> float:
    """Half the median distance from a real embedding to its nearest other real embedding."""
    flat = faiss.IndexFlatL2(real.shape[1])
    flat.add(real)
    dists, _ = flat.search(real, 2)
    return 0.5 * float(np.median(np.sqrt(np.maximum(dists[:, 1], 0))))


def standin_vectors(real: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """n stand-in vectors around the real ones (module docstring). (n, d) float16"""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(len(real), size=(2, n))
    t = rng.uniform(0.0, 0.5, size=(n, 1)).astype(np.float32)
    out = (1 - t) * real[i] + t * real[j]
    out += rng.standard_normal(out.shape, dtype=np.float32) * (noise / np.sqrt(real.shape[1]))
    return out.astype(np.float16)


def shard_plan(total: int, train: int) -> list[tuple[str, int]]:
    """(split, rows) per chunk shard in chunk id order; every shard a whole number of documents."""
    plan = []
    for split, rows in (("train", train), ("valid", HELD_OUT_ROWS), ("test", HELD_OUT_ROWS)):
        plan += [(split, min(QUERY_SHARD_ROWS, rows - s)) for s in range(0, rows, QUERY_SHARD_ROWS)]
    rest = total - train
    plan += [("retrieval", min(SHARD_ROWS, rest - s)) for s in range(0, rest, SHARD_ROWS)]
    if any(rows % CHUNKS_PER_DOC for _, rows in plan):
        raise ValueError(f"shard sizes must be multiples of {CHUNKS_PER_DOC}: {plan}")
    return plan


def write_standin_shard(db: str, path: str, first_id: int, vectors: np.ndarray) -> dict:
    """One chunk shard (no tokens: the index and neighbour stages read ids, documents and n_bytes), its
    token shard (document ids) and its embeddings; returns the embeddings' manifest entry."""
    n = len(vectors)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    docs = ids // CHUNKS_PER_DOC
    empty = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.uint16()))
    table = pa.Table.from_arrays(
        [pa.array(ids), pa.array(docs), pa.array((ids % CHUNKS_PER_DOC).astype(np.int32)), empty,
         pa.array(np.full(n, 256, np.int32))],
        schema=layout.chunk_schema(pa.uint16()),
    )  # fmt: skip
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)
    tokens = layout.aligned_path(path, layout.TOKENS)
    os.makedirs(tokens, exist_ok=True)
    tokens_npy, lengths_npy, doc_ids_npy = (os.path.join(tokens, name) for name in layout.TOKEN_ARRAYS)
    np.lib.format.open_memmap(tokens_npy, "w+", np.uint16, (n, 64)).flush()  # sparse zeros: no tokens are read
    np.save(lengths_npy, np.zeros(n, np.int16))
    np.save(doc_ids_npy, docs)
    with open(os.path.join(tokens, layout.TOKEN_META), "w") as f:
        json.dump({"first_chunk_id": first_id, "rows": n}, f)
    emb = layout.aligned_path(path, layout.EMBEDDINGS)
    os.makedirs(os.path.dirname(emb), exist_ok=True)
    np.save(emb, vectors)
    return {"path": os.path.relpath(emb, db), "rows": n, "sha256": sha256_file(emb), "status": "complete"}


def write_standin_db(db: str, source_db: str, total: int, train: int, seed: int) -> dict:
    """The stand-in DB's chunk, token and embedding shards and their manifest records (skipped when complete)."""
    if mf.read_manifest(db)["stages"].get("embeddings", {}).get("status") == "complete":
        standin = mf.read_manifest(db)["stages"]["embeddings"]["standin"]
        if (standin.get("vectors"), standin.get("train"), standin["seed"]) != (total, train, seed):
            raise SystemExit(f"{db} holds a stand-in DB of other arguments ({standin}); remove it or use another --out")
        return standin
    real = real_embeddings(source_db)
    noise = noise_norm(real)
    plan = shard_plan(total, train)
    counts: dict[str, int] = {}
    shards, first = [], 0
    for s, (split, rows) in enumerate(plan):
        index = sum(1 for p in plan[:s] if p[0] == split)
        n_shards = sum(1 for p in plan if p[0] == split)
        path = os.path.join(db, layout.shard_relpath(split, index, n_shards))
        shards.append(write_standin_shard(db, path, first, standin_vectors(real, rows, noise, seed + s)))
        first += rows
        counts[split] = counts.get(split, 0) + rows
        log.info("stand-in DB: %s shard %d of %d (%d vectors)", split, index + 1, n_shards, rows)
    standin = {
        "source_db": source_db,
        "real_embeddings": len(real),
        "noise_norm": round(noise, 4),
        "seed": seed,
        "vectors": total,
        "train": train,
    }
    mf.update_stage(db, "chunks", status="complete", config={"standin": standin}, counts={"by_split": counts})
    mf.update_stage(
        db,
        "embeddings",
        status="complete",
        config={"model_sha256": f"standin-of:{source_db}", "standin": standin},
        shards=shards,
        dim=real.shape[1],
        standin=standin,
    )
    return standin


def run_stage(args: list[str], watch: tuple[str, ...] = ()) -> tuple[float, dict]:
    """Runs ``python -m pipeline <args>``; (wall seconds, peak RSS bytes per watched process name)."""
    t0 = time.perf_counter()
    with PeakRss(watch) as rss:
        subprocess.run([sys.executable, "-m", "pipeline", *args], check=True)
    return time.perf_counter() - t0, rss.peak


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db", help="a built DB whose real embeddings the stand-in is drawn around")
    parser.add_argument("--out", default="bench/out/index-scale")
    parser.add_argument("--vectors", type=int, default=10_000_000)
    parser.add_argument("--train", type=int, default=100_000, help="train chunks: the neighbour tables' queries")
    parser.add_argument("--factory", default=FACTORY)
    parser.add_argument("--points-per-list", type=int, default=39, help="k-means training points per IVF list")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nprobe", type=int, default=0, help="the neighbour stage's nprobe (0: the index's default)")
    args = parser.parse_args()

    db = os.path.join(args.out, "db")
    t0 = time.perf_counter()
    standin = write_standin_db(db, args.db, args.vectors, args.train, args.seed)
    standin_s = time.perf_counter() - t0
    index_was_complete = mf.read_manifest(db)["stages"].get("index", {}).get("status") == "complete"
    index_s, _ = run_stage(
        ["index", "--db", db, "--index-factory", args.factory, "--max-points-per-list", str(args.points_per_list)]
    )
    index_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    nprobe = ["--nprobe", str(args.nprobe)] if args.nprobe else []
    neighbours_s, actor_rss = run_stage(["neighbours", "--db", db, "--overwrite", *nprobe], watch=("NeighbourActor",))
    manifest = mf.read_manifest(db)
    stages = manifest["stages"]
    index, neighbours = stages["index"], stages["neighbours"]
    result = {
        "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "standin": standin,
        "standin_db_seconds": round(standin_s, 1),
        "vectors": index["vectors"],
        "factory": index["config"]["factory"],
        "index": {
            "wall_seconds": None if index_was_complete else round(index_s, 1),  # None: an earlier run's
            "train_seconds": index["train_seconds"],
            "train_points": index["train_points"],
            "add_seconds": index["add_seconds"],
            "recall_seconds": index["recall_seconds"],
            "bytes": index["bytes"],
            "peak_rss_bytes": None if index_was_complete else index_rss,
            "default_nprobe": index["default_nprobe"],
            "default_rerank_factor": search_defaults(manifest)[1],
            "recall_at_10": index["recall_at_10"],
            "exact_qps": index["exact_qps"],
            "recall_grid": index["recall_grid"],
        },
        "neighbours": {
            "wall_seconds": round(neighbours_s, 1),
            "queries": neighbours["counts"]["chunks"],
            "queries_per_s": neighbours["queries_per_s_this_run"],
            "actor_seconds": neighbours["actor_seconds_this_run"],
            "coverage": neighbours["counts"]["coverage"],
            "nprobe": neighbours["config"]["nprobe_used"],
            "peak_rss_per_actor_bytes": actor_rss["NeighbourActor"],
        },
    }
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
