"""``python -m pipeline``: build the RETRO retrieval database, stage by stage or end to end.

Unknown ``--flags`` are passed to Apache Beam, so ``--runner=DataflowRunner --project=...``,
``--runner=FlinkRunner --flink_master=...`` or ``--runner=SparkRunner`` choose a cluster runner.
"""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_CORPUS = "data/python-docs-3.11.jsonl.zst"


def _add_chunk_args(p: argparse.ArgumentParser) -> None:
    from pipeline.chunk_pipeline import ChunkConfig

    d = ChunkConfig()
    p.add_argument("--corpus", nargs="+", default=[DEFAULT_CORPUS], help="files, directories, globs or URIs (default: the bundled corpus)")
    p.add_argument("--tokenizer", help="an HF tokenizers tokenizer.json for the LM; default: train a byte-level BPE on the corpus")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained tokenizer")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size)
    p.add_argument("--text-field", default=d.text_field, help="JSON field / Parquet column holding the text")
    p.add_argument("--max-record-bytes", type=int, default=d.max_record_bytes, help="larger records are rejected")
    p.add_argument("--valid-fraction", type=float, default=d.valid_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--num-shards", type=int, default=d.num_shards, help="train shards (valid/test get a proportional share)")
    p.add_argument("--dedup-threshold", type=float, default=d.dedup_threshold, help="MinHash Jaccard for near-duplicates")
    p.add_argument("--dedup-ngram", type=int, default=d.dedup_ngram)
    p.add_argument("--leakage-threshold", type=float, default=d.leakage_threshold)
    p.add_argument("--leakage-ngram", type=int, default=d.leakage_ngram)


def _chunk_config(args):
    from pipeline.chunk_pipeline import ChunkConfig

    return ChunkConfig(
        chunk_size=args.chunk_size, text_field=args.text_field, max_record_bytes=args.max_record_bytes,
        valid_fraction=args.valid_fraction, test_fraction=args.test_fraction, num_shards=args.num_shards,
        dedup_threshold=args.dedup_threshold, dedup_ngram=args.dedup_ngram,
        leakage_threshold=args.leakage_threshold, leakage_ngram=args.leakage_ngram,
    )


def run_chunks(args, beam_args) -> dict:
    from pipeline.chunk_pipeline import write_chunk_shards

    return write_chunk_shards(
        args.corpus, args.db, config=_chunk_config(args), tokenizer_path=args.tokenizer,
        vocab_size=args.vocab_size, beam_args=beam_args, overwrite=args.overwrite,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    chunks = sub.add_parser("chunks", help="stage 1: corpus -> deduplicated chunk shards (Beam)")
    for p in (chunks,):
        p.add_argument("--db", default="db", help="output directory or URI (default: ./db)")
        p.add_argument("--overwrite", action="store_true", help="rebuild stages whose config changed instead of refusing")
        p.add_argument("-v", "--verbose", action="store_true")
    _add_chunk_args(chunks)
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    from pipeline.manifest import ConfigMismatch

    try:
        if args.command == "chunks":
            record = run_chunks(args, beam_args)
            logging.getLogger("pipeline").info("chunks: %s", {k: v for k, v in record["counts"].items() if k != "by_split"})
    except (ConfigMismatch, FileNotFoundError, ValueError) as e:
        logging.getLogger("pipeline").error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
