"""Every path and file name of a RETRO DB, and the Parquet schemas of its shards.

    DB/manifest.json                    one record per stage (``retro_db.manifest``)
    DB/tokenizer.json                   the LM tokenizer (HF tokenizers format)
    DB/chunks/<split>/shard-*.parquet   chunks: chunk_id, doc_id, chunk_index, tokens, n_bytes
                                        (split: train, valid, test, or retrieval: duplicates of train
                                        documents, retrievable and never trained on)
    DB/documents/<split>/shard-*.parquet  one row per kept document (source, position, meta, ...)
    DB/tokens/<split>/shard-*/          each chunk shard's tokens as padded .npy arrays (O(1) reads)
    DB/embeddings/<split>/shard-*.npy   (n, d) fp16 frozen-BERT embeddings, rows aligned with the chunks
    DB/index/trained.faissindex         the trained, empty IVF-PQ index
    DB/index/<train|retrieval>/shard-*.faissindex   one index shard per train or retrieval chunk shard
    DB/neighbours/<split>/shard-*.parquet  chunk_id, neighbour_ids, distances
    DB/rejected/<reason>-*.jsonl        dead-letter records with their reasons
    DB/deleted/audit.jsonl              every deletion and restoration: when, who, which documents, why
    DB/deleted/state.npz                the documents deleted now and their chunks (``retro_db.deletions``)
    DB/increments/<name>/               documents added later, in this same layout

Every per-shard output is named after its chunk shard (``chunks/train/shard-00000-of-00004.parquet``
-> ``embeddings/train/shard-00000-of-00004.npy``), so shards of all stages align by name. Paths are
strings joined for local directories and bucket URIs alike (``retro_db.storage.join``).
"""

from __future__ import annotations

import glob
import os

import pyarrow as pa

from retro_db.storage import join

SPLITS = ("train", "valid", "test", "retrieval")  # every split, in id order
SEQUENCE_SPLITS = ("train", "valid", "test")  # what the model trains and is evaluated on; neighbour tables
HELD_OUT_SPLITS = ("valid", "test")
# Retrievable: train chunks, and "retrieval" chunks: the build's exact and near duplicates of train
# documents. Deduplication keeps them out of the training sequences, but a retrieval DB stripped of
# them has nothing that holds a training chunk's continuation, and the model learns to ignore it.
INDEXED_SPLITS = ("train", "retrieval")

MANIFEST = "manifest.json"
MANIFEST_LOCK = ".manifest.lock"
TOKENIZER = "tokenizer.json"
CHUNKS = "chunks"
DOCUMENTS = "documents"
TOKENS = "tokens"
EMBEDDINGS = "embeddings"
INDEX = "index"
NEIGHBOURS = "neighbours"
REJECTED = "rejected"
DELETED = "deleted"
INCREMENTS = "increments"
STAGING_CHUNKS = ".staging-chunks"  # the Beam job's statistics before they reach the manifest
TRAINED_INDEX = "trained.faissindex"

# Inside one token shard directory.
TOKEN_ARRAYS = ("tokens.npy", "lengths.npy", "doc_ids.npy")
TOKEN_META = "meta.json"

# Inside DB/deleted: the only directory a serving deployment writes (it may be its own volume).
DELETIONS_AUDIT = "audit.jsonl"
DELETIONS_STATE = "state.npz"
DELETIONS_LOCK = ".lock"

_SUFFIX = {
    CHUNKS: ".parquet",
    DOCUMENTS: ".parquet",
    NEIGHBOURS: ".parquet",
    EMBEDDINGS: ".npy",
    INDEX: ".faissindex",
    TOKENS: "",
}


def chunk_schema(token_type: pa.DataType) -> pa.Schema:
    """Chunk shards; ``token_type`` is uint16 for vocabularies up to 2^16, else uint32."""
    return pa.schema(
        [
            ("chunk_id", pa.int64()),
            ("doc_id", pa.int64()),
            ("chunk_index", pa.int32()),
            ("tokens", pa.list_(token_type)),
            ("n_bytes", pa.int32()),
        ]
    )


DOCUMENT_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("doc_hash", pa.string()),
        ("first_chunk_id", pa.int64()),
        ("n_chunks", pa.int32()),
        ("n_tokens", pa.int32()),
        ("n_bytes", pa.int64()),
        ("source", pa.string()),
        ("position", pa.int64()),
        ("meta", pa.string()),
    ]
)
NEIGHBOUR_SCHEMA = pa.schema(
    [("chunk_id", pa.int64()), ("neighbour_ids", pa.list_(pa.int64())), ("distances", pa.list_(pa.float32()))]
)


def shard_relpath(split: str, shard: int, n_shards: int, kind: str = CHUNKS) -> str:
    """A shard's path relative to the DB (the manifest stores relative paths: DBs can move)."""
    return f"{kind}/{split}/shard-{shard:05d}-of-{n_shards:05d}{_SUFFIX[kind]}"


def chunk_shard_files(db: str, split: str | tuple[str, ...] | None = None) -> list[str]:
    """Chunk shard files of one split, of several, or of all splits, in chunk id order, of a local DB."""
    splits = [split] if isinstance(split, str) else sorted(split or SPLITS, key=SPLITS.index)
    return [f for s in splits for f in sorted(glob.glob(os.path.join(db, CHUNKS, s, f"shard-*{_SUFFIX[CHUNKS]}")))]


def document_shard_files(db: str) -> list[str]:
    """Document shard files of a local DB, every split."""
    return [
        f for s in SPLITS for f in sorted(glob.glob(os.path.join(db, DOCUMENTS, s, f"shard-*{_SUFFIX[DOCUMENTS]}")))
    ]


def aligned_path(chunk_file: str, kind: str) -> str:
    """The per-shard output of stage ``kind`` aligned with a chunk shard:
    ``DB/chunks/<split>/x.parquet`` -> ``DB/<kind>/<split>/x<suffix>`` (index shards: indexed splits only)."""
    split_dir, name = os.path.split(chunk_file)
    db = os.path.dirname(os.path.dirname(split_dir))
    return os.path.join(db, kind, os.path.basename(split_dir), name[: -len(_SUFFIX[CHUNKS])] + _SUFFIX[kind])


def split_of(chunk_file: str) -> str:
    return os.path.basename(os.path.dirname(chunk_file))


def token_shard_dirs(db: str) -> list[str]:
    """Finished token shard directories of a local DB, in chunk id order."""
    return [
        d for s in SPLITS for d in sorted(glob.glob(os.path.join(db, TOKENS, s, "shard-*"))) if not d.endswith(".tmp")
    ]


def index_shard_files(db: str) -> list[str]:
    """A DB's index shards in chunk id order (train, then retrieval)."""
    return [
        f for s in INDEXED_SPLITS for f in sorted(glob.glob(os.path.join(db, INDEX, s, f"shard-*{_SUFFIX[INDEX]}")))
    ]


def manifest_path(db: str) -> str:
    return join(db, MANIFEST)


def tokenizer_path(db: str) -> str:
    return join(db, TOKENIZER)


def trained_index_path(db: str) -> str:
    return join(db, INDEX, TRAINED_INDEX)


def deleted_path(db: str, name: str) -> str:
    return join(db, DELETED, name)


def increment_root(db: str, name: str) -> str:
    return join(db, INCREMENTS, name)


def increment_lock(db: str, name: str) -> str:
    """Held by the run adding increment ``name`` (a hidden file: never synced to a bucket)."""
    return join(db, INCREMENTS, f".{name}.lock")


def rejected_path(db: str, reason: str, part: int) -> str:
    return join(db, REJECTED, f"{reason}-{part:05d}.jsonl")


def documents_glob(db: str) -> str:
    return join(db, DOCUMENTS, "*", f"*{_SUFFIX[DOCUMENTS]}")
