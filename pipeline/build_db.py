"""``make build-db``: every stage from raw corpus to neighbour tables, each resumable."""

from __future__ import annotations

import logging
import os
import time

from pipeline import remote_db
from pipeline.chunk_pipeline import write_chunk_shards
from pipeline.embed import write_embeddings
from pipeline.index_build import write_index
from pipeline.neighbours import write_neighbours
from retro_db import layout, storage
from retro_db import manifest as mf
from retro_db.deletions import audit_log, deleted
from retro_db.search import search_defaults

log = logging.getLogger(__name__)


def summary_lines(db: str) -> list[str]:
    """A human summary of a DB's manifest."""
    manifest = mf.read_manifest(db)
    stages = manifest["stages"]
    lines = [f"RETRO DB at {db}"]
    if c := stages.get("chunks"):
        n = c["counts"]
        dropped = {k[len("rejected_") :]: v for k, v in n.items() if k.startswith("rejected_")}
        retrieval = n["by_split"].get("retrieval", {}).get("documents", 0)
        lines.append(
            f"  documents : {n['records_read']} read, {n['documents_kept']} kept ({retrieval} of them duplicates kept"
            f" for retrieval only); dropped {dropped or 'none'}"
        )
        lines.append(
            "  chunks    : "
            + ", ".join(f"{s} {v['chunks']} ({v['documents']} docs)" for s, v in n["by_split"].items())
            + f"; {n['tokens']} tokens"
        )
    if e := stages.get("embeddings"):
        lines.append(f"  embeddings: {e['counts']['chunks']} x {e['dim']} fp16, model {e['config']['model']}")
    if i := stages.get("index"):
        lines.append(
            f"  index     : {i['config']['factory']} + exact re-rank x{search_defaults(manifest)[1]},"
            f" {i['vectors']} vectors, {i['bytes'] / 1e6:.1f} MB in {len(i['shards'])} shards;"
            f" recall@10 {i['recall_at_10']:.3f} at nprobe {i['default_nprobe']}"
        )
    if nb := stages.get("neighbours"):
        per = ", ".join(f"{s} k={v['k']} {v['full']}/{v['chunks']}" for s, v in nb["counts"]["by_split"].items())
        lines.append(f"  neighbours: coverage {nb['counts']['coverage']:.3f} (chunks with all k neighbours: {per})")
    if incs := manifest.get("increments"):
        lines.append(
            f"  increments: {len(incs)} added ({sum(i['documents'] for i in incs)} docs,"
            f" {sum(i['vectors'] for i in incs)} vectors"
            f" in {sum(len(i['index_shards']) for i in incs)} index shards)"
        )
    docs, chunks = deleted(db)
    if docs.size:
        lines.append(
            f"  deleted   : {len(docs)} documents ({len(chunks)} chunks), excluded from search and training"
            f" ({len(audit_log(db))} entries in {layout.DELETED}/{layout.DELETIONS_AUDIT})"
        )
    kinds = (
        layout.CHUNKS,
        layout.DOCUMENTS,
        layout.TOKENS,
        layout.EMBEDDINGS,
        layout.INDEX,
        layout.NEIGHBOURS,
        layout.REJECTED,
    )
    lines.append(f"  outputs   : {layout.manifest_path(db)}, " + ", ".join(f"{kind}/" for kind in kinds))
    return lines


def build_db(
    corpus: list[str],
    db: str,
    *,
    chunk_kwargs: dict,
    embed_config=None,
    index_config=None,
    neighbour_config=None,
    overwrite: bool = False,
    actors: int = 0,
    work_dir: str | None = None,
    device: str = "auto",
    include_increments: bool = False,
) -> None:
    """Every stage into ``db``, a directory or a bucket URI (then stages 2-4 run on a local mirror
    in ``work_dir`` and are uploaded after each stage; see ``pipeline.remote_db``)."""
    local = db
    if storage.is_remote(db):
        local = work_dir or remote_db.default_work_dir(db)
        os.makedirs(local, exist_ok=True)
    timings = {}
    for name, run in (
        ("chunks", lambda: write_chunk_shards(corpus, db, overwrite=overwrite, **chunk_kwargs)),
        ("embeddings", lambda: write_embeddings(local, config=embed_config, actors=actors, overwrite=overwrite)),
        ("index", lambda: write_index(local, config=index_config, overwrite=overwrite, device=device)),
        (
            "neighbours",
            lambda: write_neighbours(
                local,
                config=neighbour_config,
                actors=actors,
                overwrite=overwrite,
                device=device,
                include_increments=include_increments,
            ),
        ),
    ):
        t0 = time.perf_counter()
        run()
        if local != db:
            if name == "chunks":
                remote_db.download_db(db, local)
            else:
                remote_db.upload_db(local, db)
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("stage %s done in %.1f s", name, timings[name])
    # where deletions will live: a deployment mounts its own writable volume here (deploy/kuberay)
    os.makedirs(os.path.join(local, layout.DELETED), exist_ok=True)
    for line in summary_lines(local) + [f"  seconds   : {timings}"]:
        log.info("%s", line)
