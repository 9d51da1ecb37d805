"""Does each stage's cost per token stay flat as the corpus grows? 1x vs 10x on this machine.

    make bench-scaling    # writes the 10x corpus (every section of python3.11-doc), then runs:
    python -m bench.scaling --corpus bench/out/python-docs-3.11-all.jsonl.zst \\
        [--fractions 0.01 0.1 1.0] [--repeats 3] [--out bench/out/scaling]
    python -m bench.scaling --pq-scan      # IVF-PQ codes scanned per second per thread
    python -m bench.scaling --assign --db bench/out/scaling/f1.0/db   # IVF list assignment/s, flat vs HNSW

Builds a DB from every (1/f)-th document of the corpus for each fraction f (the smallest is the
base build, the next 1x, the largest 10x), one stage CLI at a time, each stage timed --repeats
times (its outputs deleted in between; the fastest run counts) except the largest embedding run,
whose start-up jitter is under 1% of it. Per stage it reports wall microseconds per token and the
cost per token without start-up, (T(n) - T(base)) / (n - n_base): the slope of the stage's cost
from the base build, in which fixed start-up (Python, Beam workers, Ray, loading the BERT or the
index) cancels out. Flat means 10x's slope is within 20% of 1x's. The index stage's two steps done
once per DB (training on a sample, measuring recall on 1,000 held-out queries) are reported apart
from the rest of it, and the stages' own per-token work from their manifests (index add seconds,
neighbour actor-seconds). `--stages index neighbours` re-times those two on the DBs of the last run.

The default index factory grows with the DB (IVF lists ~ 4 sqrt(n)), so the index and neighbour
stages are also rerun at 1x with the 10x DB's factory and nprobe: the cost per token of the same
configuration on 10x less data. Also reports the bytes per chunk of every DB artefact, which the
cost model in docs/SCALING.md scales to 1T tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import zstandard

from retro_db import layout
from retro_db.manifest import read_manifest
from retro_db.search import load_embedding_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("chunks", "embed", "index", "neighbours")
OUTPUTS = {
    "chunks": (),
    "embed": (layout.EMBEDDINGS, layout.TOKENS),
    "index": (layout.INDEX,),
    "neighbours": (layout.NEIGHBOURS,),
}
TOLERANCE = 0.2

log = logging.getLogger("bench.scaling")


def read_corpus_lines(path: str) -> list[str]:
    data = open(path, "rb").read()
    if path.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 34)
    return data.decode("utf-8").splitlines()


def write_corpus_sample(lines: list[str], fraction: float, path: str) -> int:
    """Writes every (1/fraction)-th document, so every size has the corpus's mix of text."""
    kept = lines[:: max(1, round(1 / fraction))]
    with open(path, "w") as f:
        f.write("\n".join(kept) + "\n")
    return len(kept)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# The stages' own timings in the manifest, taken at their fastest over the repeats like the wall time.
OWN_SECONDS = {
    "index": {"index_train_s": "train_seconds", "index_add_s": "add_seconds", "index_recall_s": "recall_seconds"},
    "neighbours": {"neighbour_actor_s": "actor_seconds_this_run"},
}
RECORD = {"chunks": "chunks", "embed": "embeddings", "index": "index", "neighbours": "neighbours"}


def time_stage(stage: str, db: str, *, corpus: str, repeats: int, extra: list[str] = ()) -> dict:
    """The fastest wall seconds of `repeats` runs of one stage CLI (its outputs deleted before
    each run), and the fastest of each of the stage's own timings."""
    cmd = [sys.executable, "-m", "pipeline", stage, "--db", db, *extra] + (
        ["--corpus", corpus] if stage == "chunks" else []
    )
    best = {"seconds": float("inf")}
    for _ in range(repeats):
        if stage == "chunks":
            shutil.rmtree(db, ignore_errors=True)
        for kind in OUTPUTS[stage]:
            shutil.rmtree(os.path.join(db, kind), ignore_errors=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        record = read_manifest(db)["stages"][RECORD[stage]]
        best["seconds"] = min(best["seconds"], seconds)
        for key, name in OWN_SECONDS.get(stage, {}).items():
            best[key] = min(best.get(key, float("inf")), record[name])
        log.info("%s on %s: %.1f s", stage, db, seconds)
    return best


def manifest_figures(db: str) -> dict:
    stages = read_manifest(db)["stages"]
    index, neighbours = stages["index"], stages["neighbours"]
    return {
        "tokens": stages["chunks"]["counts"]["tokens"],
        "chunks": stages["chunks"]["counts"]["chunks"],
        "factory": index["config"]["factory"],
        "nprobe": neighbours["config"]["nprobe_used"],
        "index_train_points": index["train_points"],
        "index_vectors": index["vectors"],
        "recall_at_10": index["recall_at_10"],
        "embed_chunks_per_s": stages["embeddings"]["counts"]["chunks_per_s_this_run"],
    }


def build_and_time(
    lines: list[str],
    fraction: float,
    root: str,
    *,
    stages: tuple[str, ...],
    repeats: int,
    largest: bool,
    earlier: dict | None,
) -> dict:
    """Builds (or, for stages not in `stages`, reuses with its earlier timing) one size's DB."""
    os.makedirs(root, exist_ok=True)
    corpus = os.path.join(root, "corpus.jsonl")
    docs = write_corpus_sample(lines, fraction, corpus)
    db = os.path.join(root, "db")
    seconds, own = {}, {}
    for stage in STAGES:
        if stage in stages:
            # --overwrite: the last run may have left the 10x configuration in this DB (time_fixed_index)
            timed = time_stage(
                stage,
                db,
                corpus=corpus,
                repeats=1 if largest and stage == "embed" else repeats,
                extra=["--overwrite"] if stage in ("index", "neighbours") else [],
            )
            seconds[stage] = timed.pop("seconds")
            own.update(timed)
        elif earlier is None:
            raise SystemExit(f"no earlier timing of {stage} for fraction {fraction}: run every stage once")
        else:
            seconds[stage] = earlier["seconds"][stage]
            own.update({key: earlier[key] for key in OWN_SECONDS.get(stage, {})})
    figures = manifest_figures(db)
    kinds = (layout.CHUNKS, layout.DOCUMENTS, layout.TOKENS, layout.EMBEDDINGS, layout.INDEX, layout.NEIGHBOURS)
    sizes = {kind: dir_bytes(os.path.join(db, kind)) for kind in kinds}
    return {
        "fraction": fraction,
        "db": db,
        "documents": docs,
        "seconds": seconds,
        **own,
        **figures,
        "bytes_per_chunk": {k: round(v / figures["chunks"], 1) for k, v in sizes.items()},
    }


def time_fixed_index(row: dict, *, factory: str, nprobe: int, repeats: int) -> dict:
    """Reruns a DB's index and neighbour stages with another DB's factory and nprobe."""
    index = time_stage(
        "index", row["db"], corpus="", repeats=repeats, extra=["--overwrite", "--index-factory", factory]
    )
    neighbours = time_stage(
        "neighbours", row["db"], corpus="", repeats=repeats, extra=["--overwrite", "--nprobe", str(nprobe)]
    )
    seconds = {"index": index.pop("seconds"), "neighbours": neighbours.pop("seconds")}
    return {**row, "seconds": {**row["seconds"], **seconds}, **index, **neighbours, **manifest_figures(row["db"])}


def per_token_us(row: dict, base: dict, stage: str) -> tuple[float, float]:
    """(wall microseconds per token, microseconds per token without start-up)."""
    wall = row["seconds"][stage] / row["tokens"] * 1e6
    net = (row["seconds"][stage] - base["seconds"][stage]) / (row["tokens"] - base["tokens"]) * 1e6
    return wall, net


def pq_scan_rate(
    n: int = 400_000, d: int = 384, nlist: int = 256, nprobe: int = 16, queries: int = 500, threads: int = 1
) -> dict:
    """PQ codes scanned per second per thread in IVF lists of thousands of codes (synthetic
    vectors): the unit of neighbour-search cost at scale, where lists hold n/nlist codes."""
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    index = faiss.index_factory(d, f"IVF{nlist},PQ{d // 8}x8np")
    index.train(x[: nlist * 64])
    index.add(x)
    q = rng.standard_normal((queries, d), dtype=np.float32)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    index.search(q[:10], 32, params=params)
    t0 = time.perf_counter()
    index.search(q, 32, params=params)
    seconds = time.perf_counter() - t0
    codes = queries * nprobe * n / nlist
    return {
        "codes_per_query": codes / queries,
        "queries_per_s": queries / seconds,
        "codes_per_s_per_thread": codes / seconds / threads,
    }


def assign_rate(
    db: str,
    *,
    nlists=(1 << 12, 1 << 14, 1 << 15),
    nprobe: int = 16,
    queries: int = 2000,
    efs=(16, 32, 64),
    threads: int = 1,
) -> list[dict]:
    """Vectors assigned to their nprobe nearest IVF lists per second per thread, by a flat
    quantizer (nlist * d flops each) and by an HNSW32 graph over the same centroids at several
    efSearch, with the share of the flat quantizer's lists the graph finds. Every added vector and
    every query pays this before any PQ code is scanned. Centroids and queries are the DB's own
    embeddings (real text, clustered like k-means centroids of it would be), so nlist is at most
    the DB's size."""
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(threads)
    rows = load_embedding_rows(db, None)
    x = np.concatenate([np.asarray(a, dtype=np.float32) for a in rows.arrays])
    np.random.default_rng(0).shuffle(x)
    q, out = x[:queries], []
    for nlist in (n for n in nlists if queries + n <= len(x)):
        centroids = x[queries : queries + nlist]
        flat, hnsw = faiss.IndexFlatL2(x.shape[1]), faiss.IndexHNSWFlat(x.shape[1], 32)
        flat.add(centroids)
        t0 = time.perf_counter()
        hnsw.add(centroids)
        row = {"nlist": nlist, "hnsw32_build_s": round(time.perf_counter() - t0, 1)}
        t0 = time.perf_counter()
        _, exact = flat.search(q, nprobe)
        row["flat_per_s_per_thread"] = round(queries / (time.perf_counter() - t0))
        for ef in efs:
            hnsw.hnsw.efSearch = ef
            t0 = time.perf_counter()
            _, found = hnsw.search(q, nprobe)
            row[f"hnsw32_ef{ef}_per_s_per_thread"] = round(queries / (time.perf_counter() - t0))
            row[f"hnsw32_ef{ef}_lists_found"] = round(
                float(np.mean([len(np.intersect1d(a, b)) / nprobe for a, b in zip(exact, found)])), 3
            )
        log.info("%s", row)
        out.append(row)
    return out


def flatness(a: float, b: float) -> str:
    return f"{b / a:7.2f} {'flat' if abs(b / a - 1) <= TOLERANCE else 'NOT flat'}"


def report(rows: list[dict], fixed: dict) -> None:
    base, small, large = rows[0], rows[-2], rows[-1]
    print(
        f"base {base['tokens']:,} tokens, 1x {small['tokens']:,}, 10x {large['tokens']:,} "
        f"({large['tokens'] / small['tokens']:.1f}x); stage seconds are the fastest of the repeats"
    )
    print(
        f"{'stage':>11s} {'base s':>7s} {'1x s':>7s} {'10x s':>7s} | {'us/token wall':>17s} | "
        f"{'us/token without start-up':>25s} {'10x/1x':>7s}"
    )
    for stage in STAGES:
        (wall_a, net_a), (wall_b, net_b) = per_token_us(small, base, stage), per_token_us(large, base, stage)
        print(
            f"{stage:>11s} {base['seconds'][stage]:7.1f} "
            f"{small['seconds'][stage]:7.1f} {large['seconds'][stage]:7.1f} | "
            f"{wall_a:8.1f} {wall_b:8.1f} | {net_a:12.1f} {net_b:12.1f} {flatness(net_a, net_b)}"
        )
    print(
        f"index factory / nprobe: 1x {small['factory']} / {small['nprobe']}, 10x {large['factory']} / {large['nprobe']}"
    )
    points = ", ".join(f"{r['index_train_points']:,}" for r in rows)
    print(
        f"index steps done once per DB, seconds at base, 1x, 10x: training on a sample ({points} points) "
        f"{' '.join(str(r['index_train_s']) for r in rows)}; recall measurement "
        f"{' '.join(str(r['index_recall_s']) for r in rows)}"
    )
    rest = [
        {**r, "seconds": {"index": r["seconds"]["index"] - r["index_train_s"] - r["index_recall_s"]}}
        for r in (base, small, large)
    ]
    (_, net_a), (_, net_b) = per_token_us(rest[1], rest[0], "index"), per_token_us(rest[2], rest[0], "index")
    print(
        f"{'index without them':>18s} {rest[0]['seconds']['index']:7.1f} {rest[1]['seconds']['index']:7.1f} "
        f"{rest[2]['seconds']['index']:7.1f} | {net_a:12.2f} {net_b:12.2f} {flatness(net_a, net_b)}"
    )
    print(f"the 10x configuration ({large['factory']}, nprobe {large['nprobe']}) at 1x:")
    for stage in ("index", "neighbours"):
        (_, net_a), (_, net_b) = per_token_us(fixed, base, stage), per_token_us(large, base, stage)
        print(
            f"{stage:>11s} {fixed['seconds'][stage]:7.1f} s at 1x | "
            f"{net_a:12.1f} {net_b:12.1f} {flatness(net_a, net_b)}"
        )
    print(
        "per-token work inside the stage (index: adding vectors to the shards; neighbours: actor-seconds "
        "searching, re-ranking and writing, actor start-up excluded), us/token:"
    )
    print(f"{'':>22s} {'1x':>8s} {'1x, 10x config':>15s} {'10x':>8s} {'10x/1x':>7s}")
    for key, name in (("index_add_s", "index add"), ("neighbour_actor_s", "neighbour search")):
        a, f, b = (r[key] / r["tokens"] * 1e6 for r in (small, fixed, large))
        print(f"{name:>22s} {a:8.3f} {f:15.3f} {b:8.3f} {flatness(a, b)} (same config: {flatness(f, b).strip()})")
    print(
        f"embedding chunks/s (manifest, actor start-up included): 1x {small['embed_chunks_per_s']}, "
        f"10x {large['embed_chunks_per_s']}"
    )
    print("bytes per chunk (10x):", large["bytes_per_chunk"])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--corpus",
        default=os.path.join(REPO, "data", "python-docs-3.11.jsonl.zst"),
        help="JSONL(.zst) of the largest size (default: the bundled corpus)",
    )
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.01, 0.1, 1.0],
        help="base, 1x, ..., 10x as fractions of the corpus's documents",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=list(STAGES),
        help="stages to time; the others keep the DBs and timings of the last run in --out",
    )
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "out", "scaling"))
    parser.add_argument("--pq-scan", action="store_true", help="only measure the IVF-PQ scan rate")
    parser.add_argument("--assign", action="store_true", help="only measure IVF list assignment rates, flat vs HNSW")
    parser.add_argument(
        "--db",
        default=os.path.join(REPO, "bench", "out", "scaling", "f1.0", "db"),
        help="for --assign: a DB whose embeddings serve as centroids and queries",
    )
    args = parser.parse_args()
    if args.pq_scan:
        print(pq_scan_rate())
        return
    if args.assign:
        print(json.dumps(assign_rate(args.db), indent=1))
        return
    if len(args.fractions) < 3:
        parser.error("--fractions needs a base, a 1x and a 10x size")
    if "chunks" in args.stages and len(args.stages) < len(STAGES):
        parser.error("timing the chunk stage rebuilds each DB from scratch: time every stage with it")
    lines = read_corpus_lines(args.corpus)
    fractions = sorted(args.fractions)
    results = os.path.join(args.out, "scaling.json")
    last = json.load(open(results)) if os.path.exists(results) else {"corpus": args.corpus, "rows": []}
    if len(args.stages) < len(STAGES) and last["corpus"] != args.corpus:
        parser.error(f"the last run in {args.out} was on {last['corpus']}, not {args.corpus}: time every stage")
    earlier = {r["fraction"]: r for r in last["rows"]}
    rows = [
        build_and_time(
            lines,
            f,
            os.path.join(args.out, f"f{f}"),
            stages=tuple(args.stages),
            repeats=args.repeats,
            largest=f == fractions[-1],
            earlier=earlier.get(f),
        )
        for f in fractions
    ]
    fixed = time_fixed_index(rows[-2], factory=rows[-1]["factory"], nprobe=rows[-1]["nprobe"], repeats=args.repeats)
    json.dump(
        {"corpus": args.corpus, "rows": rows, "small_with_large_index_config": fixed}, open(results, "w"), indent=1
    )
    report(rows, fixed)


if __name__ == "__main__":
    main()
