"""Growing a built DB without retraining anything: new documents become new index shards.

    python -m pipeline add-documents --db db --corpus new-docs.jsonl [--name 2026-11]

The new documents go through the same Beam chunk pipeline (the DB's tokenizer, every document in
the train split, ids following the DB's so no existing id changes) into ``DB/increments/<name>/``,
which has the DB's own layout; the same frozen BERT embeds them and each chunk shard is added to a
copy of the DB's trained IVF-PQ index (``DB/index/trained.faissindex``): no quantizer is retrained.
Registering the increment in ``DB/manifest.json`` is the last step, so readers (a running index
service polls the manifest) see all of an increment or nothing. Reruns resume or skip.

Not applied across the boundary: near-duplicate and leakage filtering against the existing DB
(they run within the increment only); exact duplicates of existing documents are dropped.
Increments have no neighbour tables: they serve retrieval, not training.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import faiss

from pipeline.chunk_pipeline import ChunkConfig, write_chunk_shards
from pipeline.embed import EmbedConfig, write_embeddings
from pipeline.index_build import write_index_shard
from retro_db import layout
from retro_db import manifest as mf
from retro_db.storage import sha256_file

log = logging.getLogger(__name__)


def next_ids(manifest: dict) -> tuple[int, int]:
    """(first free document id, first free chunk id) after the DB and its increments."""
    counts = manifest["stages"]["chunks"]["counts"]
    ends = [(counts["documents_kept"], counts["chunks"])]
    ends += [(inc["first_doc_id"] + inc["documents"], inc["first_chunk_id"] + inc["chunks"]) for inc in manifest.get("increments", [])]
    return max(d for d, _ in ends), max(c for _, c in ends)


def _config_of(cls, record: dict):
    """A stage's config dataclass from its manifest record (the record's fingerprints left out)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in record["config"].items() if k in fields})


def add_documents(corpus: list[str], db: str, *, name: str = "", beam_args: list[str] = (), actors: int = 0) -> dict:
    """Chunks, embeds and indexes ``corpus`` as increment ``name`` of ``db``; returns its manifest entry."""
    manifest = mf.require_stages(db)
    stages = manifest["stages"]
    increments = manifest.get("increments", [])
    name = name or f"{len(increments):05d}"
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"increment name {name!r}: use letters, digits, '-' and '_'")
    if done := next((inc for inc in increments if inc["name"] == name), None):
        log.info("add-documents: increment %r is already part of %s, skipping", name, db)
        return done
    root = layout.increment_root(db, name)
    first_doc, first_chunk = next_ids(manifest)

    base = _config_of(ChunkConfig, stages["chunks"])
    config = dataclasses.replace(base, valid_fraction=0.0, test_fraction=0.0, first_doc_id=first_doc, first_chunk_id=first_chunk)
    chunks = write_chunk_shards(corpus, root, config=config, tokenizer_path=layout.tokenizer_path(db), beam_args=beam_args,
                                existing_documents=db)
    write_embeddings(root, config=_config_of(EmbedConfig, stages["embeddings"]), actors=actors)

    trained = faiss.read_index(layout.trained_index_path(db))
    skip_textless = stages["index"]["config"].get("skip_textless_chunks", True)
    shards = []
    for f in layout.chunk_shard_files(root, layout.INDEXED_SPLIT):
        path = layout.aligned_path(f, layout.INDEX)
        if not os.path.exists(path):
            write_index_shard(trained, f, path, skip_textless=skip_textless)
        shards.append({"path": os.path.relpath(path, db), "sha256": sha256_file(path), "vectors": faiss.read_index(path).ntotal})

    entry = {"name": name, "path": os.path.relpath(root, db), "inputs": chunks["config"]["inputs"],
             "first_doc_id": first_doc, "first_chunk_id": first_chunk, "documents": chunks["counts"]["documents_kept"],
             "chunks": chunks["counts"]["chunks"], "rejected": {k: v for k, v in chunks["counts"].items() if k.startswith("rejected_")},
             "index_shards": shards, "vectors": sum(s["vectors"] for s in shards)}
    with mf.locked(db):
        manifest = mf.read_manifest(db)
        manifest.setdefault("increments", []).append(entry)
        mf.write_manifest(db, manifest)
    log.info("add-documents: increment %r: %d documents, %d chunks (ids %d..%d), %d vectors in %d index shards",
             name, entry["documents"], entry["chunks"], first_chunk, first_chunk + entry["chunks"] - 1, entry["vectors"], len(shards))
    return entry
