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


def _add_later_stage_args(p: argparse.ArgumentParser) -> None:
    from pipeline.embed import EmbedConfig
    from pipeline.faiss_index import IndexConfig
    from pipeline.neighbours import NeighbourConfig

    e, i, n = EmbedConfig(), IndexConfig(), NeighbourConfig()
    p.add_argument("--model", default=e.model, help="frozen BERT: an HF path or name (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--precision", choices=("fp32", "int8"), default=e.precision, help="CPU embedding precision (GPUs use bf16 autocast)")
    p.add_argument("--embed-batch-size", type=int, default=e.batch_size)
    p.add_argument("--embed-block-rows", type=int, default=e.block_rows, help="chunks per resumable work unit")
    p.add_argument("--actors", type=int, default=0, help="Ray actors (default: one per GPU, else one per CPU)")
    p.add_argument("--index-factory", default=i.factory, help="faiss index_factory string (default: IVF-PQ scaled to the DB)")
    p.add_argument("--rerank-factor", type=int, default=i.rerank_factor, help="exact re-ranking of k*factor candidates; 0 disables")
    p.add_argument("--target-recall", type=float, default=i.target_recall)
    p.add_argument("--k-train", type=int, default=n.k_train, help="neighbours stored per train chunk")
    p.add_argument("--k-eval", type=int, default=n.k_eval, help="neighbours stored per valid/test chunk")
    p.add_argument("--nprobe", type=int, default=0, help="nprobe for neighbour search (default: the measured one)")


def _later_configs(args):
    from pipeline.embed import EmbedConfig
    from pipeline.faiss_index import IndexConfig
    from pipeline.neighbours import NeighbourConfig

    return (EmbedConfig(model=args.model, precision=args.precision, batch_size=args.embed_batch_size, block_rows=args.embed_block_rows),
            IndexConfig(factory=args.index_factory, rerank_factor=args.rerank_factor, target_recall=args.target_recall),
            NeighbourConfig(k_train=args.k_train, k_eval=args.k_eval, nprobe=args.nprobe))


def build_parser() -> argparse.ArgumentParser:
    """The CLI (deploy/'s launch files are checked against it). Unknown --flags are Beam's."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "build-db": sub.add_parser("build-db", help="every stage: corpus -> chunks -> embeddings -> index -> neighbours"),
        "chunks": sub.add_parser("chunks", help="stage 1: corpus -> deduplicated chunk shards (Beam)"),
        "embed": sub.add_parser("embed", help="stage 2: chunk shards -> BERT embeddings (Ray)"),
        "index": sub.add_parser("index", help="stage 3: embeddings -> sharded IVF-PQ index (faiss)"),
        "neighbours": sub.add_parser("neighbours", help="stage 4: neighbour tables (Ray)"),
        "add-documents": sub.add_parser("add-documents", help="grow a built DB: new documents -> new index shards, no retraining"),
        "summary": sub.add_parser("summary", help="print a DB's summary from its manifest"),
    }
    for name, p in commands.items():
        p.add_argument("--db", default="db", help="the DB directory, or for build-db/chunks a bucket URI (default: ./db)")
        p.add_argument("--overwrite", action="store_true", help="rebuild stages whose config changed instead of refusing")
        p.add_argument("-v", "--verbose", action="store_true")
        if name in ("build-db", "chunks"):
            _add_chunk_args(p)
        if name == "build-db":
            p.add_argument("--work-dir", help="local mirror for stages 2-4 when --db is a bucket URI (default: ~/.cache/retro-db/<hash>)")
        if name in ("build-db", "embed", "index", "neighbours"):
            _add_later_stage_args(p)
        if name == "add-documents":
            p.add_argument("--corpus", nargs="+", required=True, help="the new documents: files, directories, globs or URIs")
            p.add_argument("--name", default="", help="the increment's name (default: its number)")
            p.add_argument("--actors", type=int, default=0, help="Ray embedding actors (default: one per GPU, else per node)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    FileSystems.set_options(PipelineOptions(beam_args))  # e.g. --s3_endpoint_url for the driver's own reads and writes
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    if beam_args and args.command not in ("build-db", "chunks", "add-documents"):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    from pipeline.manifest import ConfigMismatch

    log = logging.getLogger("pipeline")
    try:
        if args.command == "build-db":
            from pipeline.build_db import build_db

            embed, index, neighbours = _later_configs(args)
            build_db(args.corpus, args.db, chunk_kwargs=dict(config=_chunk_config(args), tokenizer_path=args.tokenizer,
                                                              vocab_size=args.vocab_size, beam_args=beam_args),
                     embed_config=embed, index_config=index, neighbour_config=neighbours, overwrite=args.overwrite, actors=args.actors,
                     work_dir=args.work_dir)
        elif args.command == "chunks":
            record = run_chunks(args, beam_args)
            log.info("chunks: %s", {k: v for k, v in record["counts"].items() if k != "by_split"})
        elif args.command == "embed":
            from pipeline.embed import write_embeddings

            write_embeddings(args.db, config=_later_configs(args)[0], actors=args.actors, overwrite=args.overwrite)
        elif args.command == "index":
            from pipeline.faiss_index import write_index

            write_index(args.db, config=_later_configs(args)[1], overwrite=args.overwrite)
        elif args.command == "neighbours":
            from pipeline.neighbours import write_neighbours

            write_neighbours(args.db, config=_later_configs(args)[2], actors=args.actors, overwrite=args.overwrite)
        elif args.command == "add-documents":
            from pipeline.add_documents import add_documents

            add_documents(args.corpus, args.db, name=args.name, beam_args=beam_args, actors=args.actors)
        elif args.command == "summary":
            from pipeline.build_db import summary_lines

            print("\n".join(summary_lines(args.db)))
    except (ConfigMismatch, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
