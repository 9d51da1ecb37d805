"""Benchmark of stage 1: the Beam chunk pipeline against the raw ``tokenizers`` batch encoding.

Both run on the same text and the same cores: the baseline is ``Tokenizer.encode_batch_fast`` over every
document in a fresh process (Rust, all cores; it reports how many it kept busy), the pipeline is
``write_chunk_shards`` (read, normalise, exact dedup, tokenize, MinHash, LSH near-dup and
leakage removal, Parquet writing) on the local FnApiRunner with one worker per core, then the same
pipeline on Beam's Dask runner over a loopback dask.distributed cluster of ``--dask-workers``
single-threaded worker processes (same corpus, same run; 0 skips it). Throughput is input tokens
per second; the ratios are pipeline / raw tokenizer and Dask / local runner.

    python -m bench.chunk_pipeline [--scale 8] [--dask-workers 2]

``--scale N`` builds a larger corpus of distinct real text by recombining the paragraphs of
the default corpus's documents (document d, variant v: paragraphs of d and d+v interleaved).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import zstandard

from bench.dask_cluster import loopback_dask_cluster
from pipeline.__main__ import DEFAULT_CORPUS
from pipeline.chunk_pipeline import ChunkConfig, write_chunk_shards
from pipeline.lm_tokenizer import train_lm_tokenizer

log = logging.getLogger("bench.chunk_pipeline")


def load_texts(path: str) -> list[str]:
    raw = zstandard.ZstdDecompressor().decompress(open(path, "rb").read(), max_output_size=1 << 31)
    return [json.loads(line)["text"] for line in raw.decode("utf-8").splitlines()]


def scaled_texts(texts: list[str], scale: int) -> list[str]:
    if scale == 1:
        return texts
    out = []
    paragraphs = [t.split("\n\n") for t in texts]
    for v in range(scale):
        for d, own in enumerate(paragraphs):
            other = paragraphs[(d + v) % len(paragraphs)]
            mixed = [p for pair in zip(own, other) for p in pair] + own[len(other) :] + other[len(own) :]
            out.append("\n\n".join(mixed if v else own))
    return out


def write_corpus(texts: list[str], path: str) -> None:
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3).compress(data))


RAW_TOKENIZER = """
import json, sys, time
from bench.chunk_pipeline import load_texts
from tokenizers import Tokenizer
texts, tokenizer = load_texts(sys.argv[1]), Tokenizer.from_file(sys.argv[2])
tokenizer.encode_batch_fast(texts[:64], add_special_tokens=False)  # Rayon's pool starts here
wall, cpu = time.perf_counter(), time.process_time()
tokens = sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False))
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({"tokens": tokens, "seconds": wall, "cores_busy": cpu / wall}))
"""


def raw_tokenizer_rate(corpus: str, tokenizer_path: str, workers: int) -> dict:
    """The baseline in a fresh process: Rayon sizes its pool once per process, and this one has trained a
    tokenizer on one thread (``train_lm_tokenizer``); the Makefile's TOKENIZERS_PARALLELISM=false would turn the
    batch encoding serial too. ``cores_busy`` (CPU time / wall time) shows how many cores it used."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(workers)}
    done = subprocess.run(
        [sys.executable, "-c", RAW_TOKENIZER, corpus, tokenizer_path],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=DEFAULT_CORPUS)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument(
        "--dask-workers", type=int, default=2, help="worker processes of the Dask runner's cluster; 0 skips it"
    )
    args = parser.parse_args()

    texts = scaled_texts(load_texts(args.corpus), args.scale)
    with tempfile.TemporaryDirectory() as tmp:
        corpus, tok_path = os.path.join(tmp, "corpus.jsonl.zst"), os.path.join(tmp, "lm-bpe.json")
        write_corpus(texts, corpus)
        tokenizer = train_lm_tokenizer(texts[:2000], vocab_size=8192)
        tokenizer.save(tok_path)

        raw = raw_tokenizer_rate(corpus, tok_path, args.workers)
        raw_s, tokens = raw["seconds"], raw["tokens"]

        beam_args = [
            "--runner=FnApiRunner",
            f"--direct_num_workers={args.workers}",
            "--direct_running_mode=multi_processing",
        ]
        t0 = time.perf_counter()
        record = write_chunk_shards(
            [corpus], os.path.join(tmp, "db"), tokenizer_path=tok_path, config=ChunkConfig(), beam_args=beam_args
        )
        pipe_s = time.perf_counter() - t0

        dask_s = None
        if args.dask_workers:
            with loopback_dask_cluster(args.dask_workers, log_dir=os.path.join(tmp, "dask-logs")) as address:
                t0 = time.perf_counter()
                on_dask = write_chunk_shards(
                    [corpus],
                    os.path.join(tmp, "db-dask"),
                    tokenizer_path=tok_path,
                    config=ChunkConfig(),
                    beam_args=["--runner=DaskRunner", f"--dask_client_address={address}"],
                )
                dask_s = time.perf_counter() - t0
            if on_dask["shards"] != record["shards"]:
                raise SystemExit("the Dask runner wrote other shards than the local runner")

    mb = sum(len(t.encode()) for t in texts) / 1e6
    raw_tps, pipe_tps = tokens / raw_s, tokens / pipe_s
    print(f"corpus: {len(texts)} documents, {mb:.1f} MB, {tokens} tokens; workers={args.workers}")
    print(
        f"raw tokenizers encode_batch : {raw_s:8.2f} s  {raw_tps:12,.0f} tokens/s  "
        f"({raw['cores_busy']:.2f} cores busy of {args.workers})"
    )
    print(
        f"Beam chunk pipeline         : {pipe_s:8.2f} s  {pipe_tps:12,.0f} tokens/s  "
        f"(kept {record['counts']['documents_kept']} docs, {record['counts']['chunks']} chunks)"
    )
    print(f"ratio pipeline / raw        : {pipe_tps / raw_tps:.3f}")
    if dask_s:
        print(
            f"Beam on Dask, {args.dask_workers} workers     : {dask_s:8.2f} s  {tokens / dask_s:12,.0f} tokens/s  "
            "(same shards as local)"
        )
        print(f"ratio Dask / local runner   : {pipe_s / dask_s:.3f}")


if __name__ == "__main__":
    main()
