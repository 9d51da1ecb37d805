"""``python -m pipeline``: build the RETRO retrieval database, stage by stage or end to end.

Unknown ``--flags`` are passed to Apache Beam, so ``--runner=DataflowRunner --project=...``,
``--runner=FlinkRunner --flink_master=...`` or ``--runner=SparkRunner`` choose a cluster runner.
Every stage's settings are the fields of its config dataclass (``--help`` lists them).
"""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.add_documents import add_documents
from pipeline.beam_storage import use_beam_filesystems
from pipeline.build_db import build_db, summary_lines
from pipeline.chunk_pipeline import ChunkConfig, write_chunk_shards
from pipeline.embed import EmbedConfig, write_embeddings
from pipeline.index_build import IndexConfig, write_index
from pipeline.neighbours import NeighbourConfig, refresh_neighbours, write_neighbours
from pipeline.stage import ConfigMismatch
from retro_db import cli, deletions
from retro_db.token_store import TokenStore

DEFAULT_CORPUS = "data/python-docs-3.11.jsonl.zst"

# Flag names that differ from the field's: several configs share a field name.
FLAGS = {
    ChunkConfig: {},
    EmbedConfig: {"batch_size": "embed-batch-size", "block_rows": "embed-block-rows", "max_length": "embed-max-length"},
    IndexConfig: {"factory": "index-factory", "seed": "index-seed"},
    NeighbourConfig: {"batch": "neighbour-batch"},
}
SKIP = {ChunkConfig: ("first_doc_id", "first_chunk_id")}  # add-documents sets them


def _add_chunk_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        nargs="+",
        default=[DEFAULT_CORPUS],
        help="files, directories, globs or URIs (default: the bundled corpus)",
    )
    p.add_argument(
        "--tokenizer",
        help="the LM's tokenizer: an HF tokenizers JSON file, or a pretrained model's directory (python -m "
        "model.base_lm smollm2-135m prints one), <|pad|> added where missing; default: a byte-level BPE "
        "trained on the corpus",
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained tokenizer")
    cli.add_config_flags(p, ChunkConfig, flags=FLAGS[ChunkConfig], skip=SKIP[ChunkConfig])


def _add_later_stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--actors", type=int, default=0, help="Ray actors (default: one per GPU, else one per CPU)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where faiss trains the index and searches neighbours (auto: a GPU when faiss or Ray sees one)",
    )
    for cls in (EmbedConfig, IndexConfig, NeighbourConfig):
        cli.add_config_flags(p, cls, flags=FLAGS[cls])


def build_parser() -> argparse.ArgumentParser:
    """The CLI (deploy/'s launch files are checked against it). Unknown --flags are Beam's."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "build-db": sub.add_parser(
            "build-db", help="every stage: corpus -> chunks -> embeddings -> index -> neighbours"
        ),
        "chunks": sub.add_parser("chunks", help="stage 1: corpus -> deduplicated chunk shards (Beam)"),
        "embed": sub.add_parser("embed", help="stage 2: chunk shards -> BERT embeddings (Ray)"),
        "index": sub.add_parser("index", help="stage 3: embeddings -> sharded IVF-PQ index (faiss)"),
        "neighbours": sub.add_parser("neighbours", help="stage 4: neighbour tables (Ray)"),
        "add-documents": sub.add_parser(
            "add-documents", help="grow a built DB: new documents -> new index shards, no retraining"
        ),
        "summary": sub.add_parser("summary", help="print a DB's summary from its manifest"),
        "refresh-neighbours": sub.add_parser(
            "refresh-neighbours", help="replace deleted neighbours in the tables by the next candidates"
        ),
        "delete": sub.add_parser("delete", help="remove documents from retrieval and training (audited, reversible)"),
        "restore": sub.add_parser("restore", help="undo a deletion (audited)"),
        "deletions": sub.add_parser("deletions", help="print the audit log of deletions and restorations (JSON lines)"),
    }
    for name, p in commands.items():
        p.add_argument(
            "--db", default="db", help="the DB directory, or for build-db/chunks a bucket URI (default: ./db)"
        )
        p.add_argument(
            "--overwrite", action="store_true", help="rebuild stages whose config changed instead of refusing"
        )
        p.add_argument("-v", "--verbose", action="store_true")
        if name in ("build-db", "chunks"):
            _add_chunk_args(p)
        if name == "build-db":
            p.add_argument(
                "--work-dir",
                help="local mirror for stages 2-4 when --db is a bucket URI (default: ~/.cache/retro-db/<hash>)",
            )
        if name in ("build-db", "embed", "index", "neighbours"):
            _add_later_stage_args(p)
        if name in ("build-db", "neighbours"):
            p.add_argument(
                "--include-increments",
                action="store_true",
                help="neighbours may come from added documents too (default: not)",
            )
        if name == "add-documents":
            p.add_argument(
                "--corpus", nargs="+", required=True, help="the new documents: files, directories, globs or URIs"
            )
            p.add_argument("--name", default="", help="the increment's name (default: its number)")
            p.add_argument(
                "--actors", type=int, default=0, help="Ray embedding actors (default: one per GPU, else per node)"
            )
        if name in ("delete", "restore"):
            p.add_argument(
                "--doc-ids",
                type=int,
                nargs="+",
                required=True,
                help="document ids (as search results and documents/ name them)",
            )
            p.add_argument("--reason", required=True, help="why: recorded in the audit log with your user and host")
        if name == "deletions":
            p.add_argument("--since", type=int, default=0, help="entries after this seq")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    if beam_args and args.command not in ("build-db", "chunks", "add-documents"):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    use_beam_filesystems(beam_args)  # e.g. --s3_endpoint_url for the driver's own reads and writes
    log = logging.getLogger("pipeline")
    if args.command in ("build-db", "chunks"):
        chunk_kwargs = dict(
            config=cli.config_from_args(ChunkConfig, args),
            tokenizer_path=args.tokenizer,
            vocab_size=args.vocab_size,
            beam_args=beam_args,
        )
    if args.command in ("build-db", "embed", "index", "neighbours"):
        embed, index, neighbours = (
            cli.config_from_args(cls, args) for cls in (EmbedConfig, IndexConfig, NeighbourConfig)
        )
    if args.command == "build-db":
        build_db(
            args.corpus,
            args.db,
            chunk_kwargs=chunk_kwargs,
            embed_config=embed,
            index_config=index,
            neighbour_config=neighbours,
            overwrite=args.overwrite,
            actors=args.actors,
            work_dir=args.work_dir,
            device=args.device,
            include_increments=args.include_increments,
        )
    elif args.command == "chunks":
        record = write_chunk_shards(args.corpus, args.db, overwrite=args.overwrite, **chunk_kwargs)
        log.info("chunks: %s", {k: v for k, v in record["counts"].items() if k != "by_split"})
    elif args.command == "embed":
        write_embeddings(args.db, config=embed, actors=args.actors, overwrite=args.overwrite)
    elif args.command == "index":
        write_index(args.db, config=index, overwrite=args.overwrite, device=args.device)
    elif args.command == "neighbours":
        write_neighbours(
            args.db,
            config=neighbours,
            actors=args.actors,
            overwrite=args.overwrite,
            device=args.device,
            include_increments=args.include_increments,
        )
    elif args.command == "refresh-neighbours":
        log.info("refresh-neighbours: %s", refresh_neighbours(args.db))
    elif args.command == "add-documents":
        add_documents(args.corpus, args.db, name=args.name, beam_args=beam_args, actors=args.actors)
    elif args.command == "summary":
        print("\n".join(summary_lines(args.db)))
    elif args.command in ("delete", "restore"):
        entry = deletions.change(
            args.db,
            args.doc_ids,
            TokenStore(args.db),
            action=args.command,
            reason=args.reason,
            actor=deletions.cli_actor(),
        )
        print(json.dumps(entry))
    elif args.command == "deletions":
        for entry in deletions.audit_log(args.db, since=args.since):
            print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    cli.run(main, "pipeline", errors=cli.USER_ERRORS + (ConfigMismatch,))
