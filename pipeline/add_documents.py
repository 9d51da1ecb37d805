"""Growing a built DB without retraining anything: new documents become new index shards.

    python -m pipeline add-documents --db db --corpus new-docs.jsonl [--name 2026-11]

The new documents go through the same Beam chunk pipeline (the DB's tokenizer, every document in
the train split, ids following the DB's so no existing id changes) into ``DB/increments/<name>/``,
which has the DB's own layout; the same frozen BERT embeds them and each chunk shard is added to a
copy of the DB's trained IVF-PQ index (``DB/index/trained.faissindex``): no quantizer is retrained.
Registering the increment in ``DB/manifest.json`` is the last step, so readers (a running index
service polls the manifest) see all of an increment or nothing. Reruns resume or skip.

Ids are reserved first, under the DB's lock: the run records in the manifest a range of document
and chunk ids bounded by its corpus (at most one document per record, one chunk per byte of text
plus one), so concurrent runs never take the same ids; a rerun after a crash takes its own
reservation back (same name and inputs: same ids, same bytes). Registration replaces the
reservation with the increment, after checking the increment fits it.

Across the boundary: exact duplicates of existing documents are dropped, and documents that
match one of the DB's valid/test documents are dropped as leakage (the build's own rule).
Near-duplicates of existing documents are not looked for. Increments have no neighbour tables:
they serve retrieval, and the neighbour stage leaves them out unless asked (``--include-increments``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os

import faiss

from pipeline.chunk_pipeline import ChunkConfig, write_chunk_shards
from pipeline.corpus_io import match_inputs, read_records
from pipeline.embed import EmbedConfig, write_embeddings
from pipeline.index_build import write_index_shard
from pipeline.stage import config_of
from retro_db import layout
from retro_db import manifest as mf
from retro_db.corpus import Record
from retro_db.failpoints import failpoint
from retro_db.storage import sha256_file

log = logging.getLogger(__name__)


def next_ids(manifest: dict) -> tuple[int, int]:
    """(first free document id, first free chunk id) after the DB, its increments and the ranges reserved by
    running ones."""
    counts = manifest["stages"]["chunks"]["counts"]
    ends = [(counts["documents_kept"], counts["chunks"])]
    ends += [
        (inc["first_doc_id"] + inc["documents"], inc["first_chunk_id"] + inc["chunks"])
        for inc in manifest.get("increments", [])
    ]
    ends += [
        (r["first_doc_id"] + r["max_documents"], r["first_chunk_id"] + r["max_chunks"])
        for r in manifest.get("reservations", [])
    ]
    return max(d for d, _ in ends), max(c for _, c in ends)


def id_bounds(inputs: list, text_field: str, max_record_bytes: int) -> tuple[int, int]:
    """(most documents, most chunks) a corpus can give: one document per record, and a chunk holds
    at least one token, which covers at least one byte of text (plus the end-of-document token)."""
    documents = chunks = 0
    for path, size in inputs:
        for item in read_records(path, size, text_field=text_field, max_record_bytes=max_record_bytes):
            if isinstance(item, Record):
                documents += 1
                chunks += len(item.text.encode("utf-8")) + 1
    return documents, chunks


def reserve(db: str, name: str, corpus: list[str], config: ChunkConfig) -> dict:
    """This run's increment entry if it is registered already, else its id reservation (taken under
    the DB's lock; a rerun with the same name and inputs gets its earlier one back)."""
    inputs = [list(x) for x in match_inputs(corpus)]

    def taken(manifest: dict) -> dict | None:
        """The increment or reservation already under this name (the same inputs, or an error)."""
        if done := next((inc for inc in manifest.get("increments", []) if inc["name"] == name), None):
            return done
        if mine := next((r for r in manifest.get("reservations", []) if r["name"] == name), None):
            if mine["inputs"] != inputs:
                raise ValueError(
                    f"increment {name!r} is being added from other inputs "
                    f"({mine['inputs'][:2]}...); give another --name"
                )
            log.info("add-documents: resuming increment %r with its reserved ids", name)
        return mine

    with mf.locked(db):
        manifest = mf.read_manifest(db)
        reservations = manifest.get("reservations", [])
        name = name or next(
            (r["name"] for r in reservations if r["inputs"] == inputs),
            f"{len(manifest.get('increments', [])) + len(reservations):05d}",
        )
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"increment name {name!r}: use letters, digits, '-' and '_'")
        if found := taken(manifest):
            return found
    # outside the lock: it reads the corpus
    max_documents, max_chunks = id_bounds(inputs, config.text_field, config.max_record_bytes)
    with mf.locked(db):
        manifest = mf.read_manifest(db)
        if found := taken(manifest):  # a run of the same name reserved meanwhile (the run lock decides)
            return found
        first_doc, first_chunk = next_ids(manifest)
        mine = {
            "name": name,
            "inputs": inputs,
            "first_doc_id": first_doc,
            "first_chunk_id": first_chunk,
            "max_documents": max_documents,
            "max_chunks": max_chunks,
            "pid": os.getpid(),
        }
        manifest.setdefault("reservations", []).append(mine)
        mf.write_manifest(db, manifest)
    log.info(
        "add-documents: reserved document ids %d.. and chunk ids %d.. (%d, %d) for %r",
        first_doc,
        first_chunk,
        max_documents,
        max_chunks,
        name,
    )
    return mine


@contextlib.contextmanager
def run_lock(db: str, name: str):
    """One run per increment at a time; the kernel drops the lock when its process dies (kill -9 too)."""
    path = layout.increment_lock(db, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"increment {name!r} is being added by another run right now; wait for it, or give another --name"
            ) from None
        yield


def add_documents(corpus: list[str], db: str, *, name: str = "", beam_args: list[str] = (), actors: int = 0) -> dict:
    """Chunks, embeds and indexes ``corpus`` as increment ``name`` of ``db``; returns its manifest entry."""
    stages = mf.require_stages(db)["stages"]
    base = config_of(ChunkConfig, stages["chunks"])
    reservation = reserve(db, name, corpus, base)
    if "index_shards" in reservation:
        log.info("add-documents: increment %r is already part of %s, skipping", reservation["name"], db)
        return reservation
    with run_lock(db, reservation["name"]):
        registered = mf.read_manifest(db).get("increments", [])
        if done := next((inc for inc in registered if inc["name"] == reservation["name"]), None):
            return done  # the run that held the lock before finished it
        return _add_increment(db, corpus, reservation, stages, base, beam_args=beam_args, actors=actors)


def _add_increment(
    db: str, corpus: list[str], reservation: dict, stages: dict, base: ChunkConfig, *, beam_args, actors: int
) -> dict:
    name, first_doc, first_chunk = reservation["name"], reservation["first_doc_id"], reservation["first_chunk_id"]
    root = layout.increment_root(db, name)
    failpoint("add-documents:reserved")

    config = dataclasses.replace(
        base, valid_fraction=0.0, test_fraction=0.0, first_doc_id=first_doc, first_chunk_id=first_chunk
    )
    chunks = write_chunk_shards(
        corpus,
        root,
        config=config,
        tokenizer_path=layout.tokenizer_path(db),
        beam_args=beam_args,
        existing_documents=db,
    )
    failpoint("add-documents:chunks")
    write_embeddings(root, config=config_of(EmbedConfig, stages["embeddings"]), actors=actors)
    failpoint("add-documents:embeddings")

    trained = faiss.read_index(layout.trained_index_path(db))
    skip_textless = stages["index"]["config"].get("skip_textless_chunks", True)
    shards = []
    for f in layout.chunk_shard_files(root, layout.INDEXED_SPLITS):
        path = layout.aligned_path(f, layout.INDEX)
        if not os.path.exists(path):
            write_index_shard(trained, f, path, skip_textless=skip_textless)
        shards.append(
            {"path": os.path.relpath(path, db), "sha256": sha256_file(path), "vectors": faiss.read_index(path).ntotal}
        )

    entry = {
        "name": name,
        "path": os.path.relpath(root, db),
        "inputs": chunks["config"]["inputs"],
        "first_doc_id": first_doc,
        "first_chunk_id": first_chunk,
        "documents": chunks["counts"]["documents_kept"],
        "chunks": chunks["counts"]["chunks"],
        "rejected": {k: v for k, v in chunks["counts"].items() if k.startswith("rejected_")},
        "index_shards": shards,
        "vectors": sum(s["vectors"] for s in shards),
    }
    if entry["documents"] > reservation["max_documents"] or entry["chunks"] > reservation["max_chunks"]:
        raise RuntimeError(
            f"increment {name!r} outgrew its reserved ids "
            f"({entry['documents']} documents, {entry['chunks']} chunks for "
            f"{reservation['max_documents']}, {reservation['max_chunks']}): not registered"
        )
    failpoint("add-documents:index")
    with mf.locked(db):  # the increment replaces its reservation in one write
        manifest = mf.read_manifest(db)
        manifest["reservations"] = [r for r in manifest.get("reservations", []) if r["name"] != name]
        manifest.setdefault("increments", []).append(entry)
        mf.write_manifest(db, manifest)
    log.info(
        "add-documents: increment %r: %d documents, %d chunks (ids %d..%d), %d vectors in %d index shards",
        name,
        entry["documents"],
        entry["chunks"],
        first_chunk,
        first_chunk + entry["chunks"] - 1,
        entry["vectors"],
        len(shards),
    )
    return entry
