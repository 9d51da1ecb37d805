"""Stage 1 at 1M, 10M and 100M+ tokens, on the local runner and on Dask: throughput, cost per token, memory.

    make corpus-large bench-chunk-scale
    # = python -m bench.large_corpus; python -m bench.chunk_scale --corpus bench/out/large/corpus.jsonl.zst

The corpus is ``bench.large_corpus`` (Debian documentation, >= 100M tokens, planted copies); each
fraction f takes every (1/f)-th of its records. Per fraction, side by side in one run:

- the raw tokenizer, ``encode_batch_fast`` over the same texts in a fresh process on all cores
  (``TOKENIZERS_PARALLELISM=true``, ``RAYON_NUM_THREADS`` = cores; it reports the cores it kept busy);
- ``python -m pipeline chunks`` on the local FnApiRunner (one SDK worker process per core);
- the same on Beam's Dask runner over a loopback dask.distributed cluster of ``--dask-workers``
  single-threaded worker processes.

Each reports wall seconds, input tokens/s, the ratio to the raw tokenizer, and the peak resident
memory of the driver and of the busiest worker process (polled every 0.5 s). Cost per token is
wall time / tokens, and the slope from the smallest fraction, (T(n) - T(base)) / (n - n_base), in
which start-up cancels out; "flat" means the largest fraction's slope is within 20% of the middle
one's (10x apart). The planted pairs whose both records a fraction holds are checked in its DB: a
planted copy and the document it copies never both end up in a sequence split.
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

import pyarrow.parquet as pq
import zstandard

from bench.chunk_pipeline import raw_tokenizer_rate
from bench.dask_cluster import loopback_dask_cluster
from bench.process_memory import PeakRss
from retro_db import layout

log = logging.getLogger("bench.chunk_scale")

TOLERANCE = 0.2
LOCAL = ("--runner=FnApiRunner", "--direct_running_mode=multi_processing")
# what each runner's processes are called on their command lines: the driver, then its workers
PROCESSES = {"local": ("pipeline chunks", "sdk_worker_main"), "dask": ("pipeline chunks", "dask worker")}


def corpus_lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read().splitlines()


def write_fraction(lines: list[bytes], fraction: float, path: str) -> list[bytes]:
    """Every (1/fraction)-th record (the first included) as JSONL.zst; returns them."""
    picked = lines[:: max(1, round(1 / fraction))]
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3, threads=-1).compress(b"\n".join(picked) + b"\n"))
    return picked


def run_chunks(corpus: str, db: str, tokenizer: str, beam_args: list[str], watch: tuple[str, ...]) -> dict:
    """One chunk stage in its own process: wall seconds, the manifest's counts, peak RSS per watched process."""
    shutil.rmtree(db, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline", "chunks", "--corpus", corpus, "--db", db, "--tokenizer", tokenizer]
    t0 = time.perf_counter()
    with PeakRss(watch, with_children=("dask worker",)) as rss:
        done = subprocess.run(cmd + beam_args, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:  # recorded, and the bench goes on: a failure at one size is a result too
        sys.stderr.write(done.stderr[-20000:])
        return {"failed": done.stderr.strip().splitlines()[-1][:2000], "seconds": round(seconds, 1)}
    manifest = json.load(open(os.path.join(db, layout.MANIFEST)))
    record = manifest["stages"]["chunks"]
    return {
        "seconds": round(seconds, 1),
        "counts": record["counts"],
        "shards": [(s["chunks_file"]["sha256"], s["documents_file"]["sha256"]) for s in record["shards"]],
        "peak_rss_mb": {name: round(b / 2**20) for name, b in rss.peak.items()},
    }


def planted_outcomes(db: str, lines: list[bytes]) -> dict:
    """Where each planted copy (whose original is among ``lines``, the DB's corpus) and the document it copies
    ended: a split or a rejection reason."""
    where = {}  # 1-based line -> split or rejected:<reason>
    for f in layout.document_shard_files(db):
        split = layout.split_of(f)
        for position in pq.read_table(f, columns=["position"])["position"].to_pylist():
            where[position] = split
    rejected = os.path.join(db, layout.REJECTED)
    for f in sorted(os.listdir(rejected)) if os.path.isdir(rejected) else ():
        for line in open(os.path.join(rejected, f)):
            r = json.loads(line)
            where[r["position"]] = f"rejected:{r['reason']}"
    metas = [json.loads(line)["meta"] for line in lines]
    by_path = {(m["package"], m["path"]): i + 1 for i, m in enumerate(metas) if "planted" not in m}
    pairs = {"exact": [], "near": []}
    for i, m in enumerate(metas):
        if "planted" in m and (m["package"], m["of"]) in by_path:
            pairs[m["planted"]].append((where.get(i + 1, "lost"), where.get(by_path[(m["package"], m["of"])], "lost")))
    both_trained = sum(
        a in layout.SEQUENCE_SPLITS and b in layout.SEQUENCE_SPLITS for p in pairs.values() for a, b in p
    )
    return {
        "pairs": {kind: len(p) for kind, p in pairs.items()},
        "both_in_sequence_splits": both_trained,
        "lost": sum("lost" in pair for p in pairs.values() for pair in p),
        "copy_ended": {kind: sorted({a for a, _ in p}) for kind, p in pairs.items()},
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="bench/out/large/corpus.jsonl.zst")
    parser.add_argument("--tokenizer", default=layout.tokenizer_path("db"))
    parser.add_argument("--out", default="bench/out/chunk-scale")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--dask-workers", type=int, default=2, help="0 skips the Dask runner")
    parser.add_argument("--tokens-per-shard", type=int, default=4_000_000, help="sets each run's --num-shards")
    parser.add_argument("--bucket-block", type=int, default=0, help="the chunk stage's --bucket-block (0: its default)")
    parser.add_argument("--dask-memory-limit", default="12GB", help="each Dask worker's limit")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    lines = corpus_lines(args.corpus)
    results = []
    for fraction in sorted(args.fractions):
        corpus = os.path.join(args.out, f"corpus-{fraction}.jsonl.zst")
        picked = write_fraction(lines, fraction, corpus)
        row = {"fraction": fraction, "raw": raw_tokenizer_rate(corpus, args.tokenizer, args.workers)}
        # shards of a bounded size: one worker writes each shard, so its memory would grow with the corpus
        row["num_shards"] = max(4, -(-row["raw"]["tokens"] // args.tokens_per_shard))
        shards = [f"--num-shards={row['num_shards']}"] + (
            [f"--bucket-block={args.bucket_block}"] if args.bucket_block else []
        )
        local = [*LOCAL, f"--direct_num_workers={args.workers}", *shards]
        row["local"] = run_chunks(corpus, os.path.join(args.out, "db"), args.tokenizer, local, PROCESSES["local"])
        if args.dask_workers:
            with loopback_dask_cluster(
                args.dask_workers, log_dir=os.path.join(args.out, "dask-logs"), memory_limit=args.dask_memory_limit
            ) as address:
                dask = ["--runner=DaskRunner", f"--dask_client_address={address}", *shards]
                row["dask"] = run_chunks(
                    corpus, os.path.join(args.out, "db-dask"), args.tokenizer, dask, PROCESSES["dask"]
                )
            dask_shards, local_shards = row["dask"].pop("shards", None), row["local"].get("shards")
            row["dask"]["same_shards_as_local"] = dask_shards is not None and dask_shards == local_shards
        if "failed" not in row["local"]:
            row["local"].pop("shards")
            row["planted"] = planted_outcomes(os.path.join(args.out, "db"), picked)
        results.append(row)
        log.info("fraction %s: %s", fraction, json.dumps(row))
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(results, f, indent=1)
    print_table(results, args.workers)


def slope_us(results: list[dict], runner: str, row: dict) -> float:
    """Microseconds per token from the smallest fraction to ``row``: start-up cancels out."""
    base, dn = results[0], row["raw"]["tokens"] - results[0]["raw"]["tokens"]
    return (row[runner]["seconds"] - base[runner]["seconds"]) / dn * 1e6 if dn else float("nan")


def print_table(results: list[dict], workers: int) -> None:
    print(f"machine: {os.cpu_count()} cores; raw tokenizer on {workers} threads")
    for runner in [r for r in ("local", "dask") if r in results[0]]:
        print(f"\n{runner}: tokens  seconds  tok/s  ratio-to-raw  us/token  slope-us/token  driver-MB  worker-MB")
        driver, worker = PROCESSES[runner]
        for row in results:
            run, tokens = row[runner], row["raw"]["tokens"]
            if "failed" in run:
                print(f"  {tokens:>12,} FAILED after {run['seconds']} s: {run['failed']}")
                continue
            raw_tps = tokens / row["raw"]["seconds"]
            print(
                f"  {tokens:>12,} {run['seconds']:8.1f} {tokens / run['seconds']:>9,.0f} "
                f"{tokens / run['seconds'] / raw_tps:6.3f} {run['seconds'] / tokens * 1e6:8.3f} "
                f"{slope_us(results, runner, row):8.3f} {run['peak_rss_mb'][driver]:>8} {run['peak_rss_mb'][worker]:>8}"
                f"  (raw {raw_tps:,.0f} tok/s, {row['raw']['cores_busy']:.2f} cores busy)"
            )
        if len(results) >= 3 and not any("failed" in row[runner] for row in results):
            ratio = slope_us(results, runner, results[-1]) / slope_us(results, runner, results[-2])
            verdict = "flat" if abs(ratio - 1) <= TOLERANCE else "NOT flat"
            print(f"{runner}: slope at the largest / at the middle fraction = {ratio:.3f} ({verdict})")
    for row in results:
        print(f"planted pairs at {row['fraction']}:", json.dumps(row.get("planted")))


if __name__ == "__main__":
    main()
