"""Does each stage's cost per token stay flat as the corpus grows? 1x vs 10x on this machine.

    python -m bench.scaling [--fractions 0.1 0.3 1.0] [--out bench/out/scaling]
    python -m bench.scaling --pq-scan      # IVF-PQ codes scanned per second per thread

Builds a DB from every (1/f)-th document of the bundled corpus for each fraction f, one stage CLI
at a time, and reports per stage: wall seconds (start-up included), microseconds per token, the
stage's own throughput from the manifest, the ratio of per-token cost at the largest fraction to
the smallest, and the marginal cost per token between consecutive sizes, in which fixed start-up
(Beam workers, Ray, loading the BERT) cancels out. Also the bytes per chunk of every DB artefact, which the
cost model in docs/SCALING.md scales to 1T tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import zstandard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("chunks", "embed", "index", "neighbours")


def write_corpus_subset(fraction: float, path: str) -> int:
    data = zstandard.ZstdDecompressor().decompress(open(os.path.join(REPO, "data", "python-docs-3.11.jsonl.zst"), "rb").read(),
                                                   max_output_size=1 << 30)
    lines = data.decode("utf-8").splitlines()
    step = max(1, round(1 / fraction))
    kept = lines[::step]
    with open(path, "w") as f:
        f.write("\n".join(kept) + "\n")
    return len(kept)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def build_and_time(corpus: str, db: str) -> dict:
    seconds = {}
    for stage in STAGES:
        cmd = [sys.executable, "-m", "pipeline", stage, "--db", db] + (["--corpus", corpus] if stage == "chunks" else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        seconds[stage] = time.perf_counter() - t0
    return seconds


def pq_scan_rate(n: int = 400_000, d: int = 384, nlist: int = 256, nprobe: int = 16, queries: int = 500, threads: int = 1) -> dict:
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
    return {"codes_per_query": codes / queries, "queries_per_s": queries / seconds, "codes_per_s_per_thread": codes / seconds / threads}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "out", "scaling"))
    parser.add_argument("--pq-scan", action="store_true", help="only measure the IVF-PQ scan rate")
    args = parser.parse_args()
    if args.pq_scan:
        print(pq_scan_rate())
        return
    rows = []
    for fraction in sorted(args.fractions):
        root = os.path.join(args.out, f"f{fraction}")
        os.makedirs(root, exist_ok=True)
        corpus = os.path.join(root, "corpus.jsonl")
        docs = write_corpus_subset(fraction, corpus)
        db = os.path.join(root, "db")
        subprocess.run(["rm", "-rf", db], check=True)
        seconds = build_and_time(corpus, db)
        stages = json.load(open(os.path.join(db, "manifest.json")))["stages"]
        tokens, chunks = stages["chunks"]["counts"]["tokens"], stages["chunks"]["counts"]["chunks"]
        sizes = {kind: dir_bytes(os.path.join(db, kind)) for kind in ("chunks", "documents", "tokens", "embeddings", "index", "neighbours")}
        rows.append({"fraction": fraction, "documents": docs, "tokens": tokens, "chunks": chunks, "seconds": seconds,
                     "embed_chunks_per_s": stages["embeddings"]["counts"]["chunks_per_s_this_run"],
                     "index_train_s": stages["index"]["train_seconds"], "index_add_s": stages["index"]["add_seconds"],
                     "neighbour_queries_per_s": stages["neighbours"]["queries_per_s_this_run"],
                     "bytes_per_chunk": {k: round(v / chunks, 1) for k, v in sizes.items()}})
        logging.info("fraction %.2f: %s", fraction, rows[-1])
    json.dump(rows, open(os.path.join(args.out, "scaling.json"), "w"), indent=1)

    small, large = rows[0], rows[-1]
    scale = large["tokens"] / small["tokens"]
    print(f"{small['tokens']:,} -> {large['tokens']:,} tokens ({scale:.1f}x); microseconds per token (wall, start-up included)")
    print(f"{'stage':>11s} {'small':>9s} {'large':>9s} {'large/small':>12s}")
    for stage in STAGES:
        a, b = (r["seconds"][stage] / r["tokens"] * 1e6 for r in (small, large))
        print(f"{stage:>11s} {a:9.1f} {b:9.1f} {b / a:12.2f}")
    print("marginal microseconds per token between consecutive sizes (start-up cancels out):")
    print(f"{'stage':>11s} " + " ".join(f"{a['fraction']:>5.1f}->{b['fraction']:<5.1f}" for a, b in zip(rows, rows[1:])) + f" {'last/first':>11s}")
    for stage in STAGES:
        marginal = [(b["seconds"][stage] - a["seconds"][stage]) / (b["tokens"] - a["tokens"]) * 1e6 for a, b in zip(rows, rows[1:])]
        print(f"{stage:>11s} " + " ".join(f"{m:12.1f}" for m in marginal) + f" {marginal[-1] / marginal[0]:11.2f}")
    print("stage throughput without start-up (manifest):")
    for key in ("embed_chunks_per_s", "neighbour_queries_per_s"):
        print(f"{key:>24s} {small[key]:9.1f} {large[key]:9.1f} {large[key] / small[key]:6.2f}")
    print("bytes per chunk:", large["bytes_per_chunk"])


if __name__ == "__main__":
    main()
