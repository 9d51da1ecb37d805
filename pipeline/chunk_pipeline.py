"""Stage 1 (Apache Beam): corpus files in, deduplicated 64-token chunk shards out.

    files -> ReadCorpus -> Normalize -> ExactDedup -> Tokenize -> MinHash
          -> DropNearDuplicates (within a split) + DropLeakage (train vs valid/test)
          -> WriteChunkShards (dense chunk ids: per-shard counts, prefix sums joined to each shard)

Every record read ends in exactly one place: a kept document, or ``DB/rejected/`` with its
reason (bad records and every kind of drop alike), so ``records_read == kept + rejected``; and every
near-duplicate or leak pair verified leaves the verifying stages (counted by a Beam counter where it is
verified and again in the data, on runners that report metrics). The stage fails rather than record a
DB where either count does not add up.

Duplicates of train documents (exact copies and near-duplicates) are kept out of the training
sequences but, unless ``retrieval_duplicates`` is off, kept in the DB as the split "retrieval":
indexed and retrievable, never trained on, never a query of the neighbour tables (see
``retro_db.layout.INDEXED_SPLITS`` for why). Duplicates of valid/test documents, and anything
that leaks into valid/test, are rejected.

Ids: documents are ordered by (split, shard, document hash, source, position); chunk ids are dense
over that order, so the continuation of chunk i is chunk i+1 exactly when both belong to the same
document, and the same input and config give the same ids and bytes on any runner.

Records between the steps are plain dicts (any runner's coder carries them), each field made here:

    made by           fields it adds (the record keeps those before it unless said)
    ReadRecordsFn     retro_db.corpus.Record: source str, position int, text str, meta str (JSON)
    NormalizeFn       a dict: source, position, meta, text str (normalised), key bytes (blake2b-128 of text)
    KeepFirstFn       copies [(source, position, meta)]: its exact copies (with retrieval duplicates)
    TokenizeFn        tokens bytes (uint32 LM ids + <|endoftext|>), split str; text dropped
    MinHashFn         dedup_sig, leakage_sig bytes (uint32 MinHash of dedup_ngram / leakage_ngram shingles)
    FindNearDuplicates  (band key bytes, (key, split, signature bytes)) per LSH band; for a bucket larger
                      than a block, ((band, i, j), (block, key, split, signature bytes)) per tile; then
                      (key, the smallest key it matches) per verified pair
    ApplyDropsFn      key, split, source, position, meta, tokens only; split "retrieval" for copies kept
    any step          retro_db.corpus.Rejected (source, position, reason, detail) for what it drops
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline import corpus_io, minhash
from pipeline.lm_tokenizer import train_lm_tokenizer
from pipeline.stage import Stage, delete_tree
from retro_db import layout, storage
from retro_db import manifest as mf
from retro_db.corpus import Record, Rejected, chunk_count, document_key, document_tokens, normalize_text
from retro_db.layout import SPLITS
from retro_db.tokenizer import EOS, load_lm_tokenizer, special_id, token_byte_lengths, tokenizer_for_db

log = logging.getLogger(__name__)

EMPTY = "empty"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
LEAKAGE = "leakage"
COUNTERS = "retro.chunks"
EXISTING = "existing"  # marks a text hash of a document already in the DB (add-documents)


@dataclass
class ChunkConfig:
    """Everything that determines the chunk shards' bytes (recorded in the manifest)."""

    chunk_size: int = 64
    text_field: str = field(default="text", metadata={"help": "JSON field / Parquet column holding the text"})
    max_record_bytes: int = field(default=8 << 20, metadata={"help": "larger records are rejected"})
    valid_fraction: float = 0.03
    test_fraction: float = 0.03
    num_shards: int = field(
        default=4, metadata={"help": "train shards (valid/test get a proportional share, at least one)"}
    )
    num_perm: int = 128
    lsh_bands: int = 16
    lsh_rows: int = 8
    dedup_ngram: int = 5
    dedup_threshold: float = field(default=0.8, metadata={"help": "MinHash Jaccard for near-duplicates"})
    leakage_ngram: int = 13
    leakage_threshold: float = field(
        default=0.8, metadata={"help": "MinHash Jaccard of a train document to a valid/test one that drops it"}
    )
    bucket_block: int = field(
        default=1000,
        metadata={"help": "LSH bucket members verified together: a larger bucket is split into tiles of two blocks"},
    )
    retrieval_duplicates: bool = field(
        default=True,
        metadata={
            "help": "exact and near duplicates of train documents stay retrievable (split 'retrieval'), "
            "never trained on"
        },
    )
    rejected_shards: int = 1
    first_doc_id: int = 0  # ids start here: an increment's ids follow its DB's (add-documents)
    first_chunk_id: int = 0

    def shards_of(self, split: str) -> int:
        if split in ("train", "retrieval"):
            return self.num_shards
        fraction = self.valid_fraction if split == "valid" else self.test_fraction
        return max(1, round(self.num_shards * fraction / max(1e-9, 1 - self.valid_fraction - self.test_fraction)))


def _unit_hash(key: bytes, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=salt).digest(), "big")


def split_of(key: bytes, config: ChunkConfig) -> str:
    u = _unit_hash(key, b"split") / 2.0**64
    if u < config.test_fraction:
        return "test"
    if u < config.test_fraction + config.valid_fraction:
        return "valid"
    return "train"


def shard_of(key: bytes, split: str, config: ChunkConfig) -> int:
    return _unit_hash(key, b"shard") % config.shards_of(split)


def doc_tokens(doc: dict) -> np.ndarray:
    """A tokenized document's LM token ids. (t,) uint32"""
    return np.frombuffer(doc["tokens"], dtype=np.uint32)


def _rejected(doc: dict, reason: str, detail: str) -> Rejected:
    return Rejected(doc["source"], doc["position"], reason, detail)


def _count(name: str, n: int = 1) -> None:
    Metrics.counter(COUNTERS, name).inc(n)


# ---------------------------------------------------------------------------------------------
# DoFns: one responsibility each.


class ReadRecordsFn(beam.DoFn):
    """(path, size) -> Record, or Rejected."""

    def __init__(self, text_field: str, max_record_bytes: int):
        self.text_field, self.max_record_bytes = text_field, max_record_bytes

    def process(self, path_size):
        path, size = path_size
        for item in corpus_io.read_records(
            path, size, text_field=self.text_field, max_record_bytes=self.max_record_bytes
        ):
            _count("records_read")
            if isinstance(item, Rejected):
                _count(f"rejected_{item.reason}")
            yield item


class NormalizeFn(beam.DoFn):
    """Record -> doc dict keyed by the hash of its normalised text; empty text -> Rejected."""

    def process(self, record: Record):
        text = normalize_text(record.text)
        doc = {"source": record.source, "position": record.position, "meta": record.meta}
        if not text:
            _count(f"rejected_{EMPTY}")
            yield _rejected(doc, EMPTY, "no text after normalisation")
            return
        doc["text"] = text
        doc["key"] = document_key(text)
        yield doc


class KeepFirstFn(beam.DoFn):
    """(hash, [docs with that exact text]) -> the first by (source, position), carrying the rest as
    its ``copies`` [(source, position, meta)] (``ApplyDropsFn`` decides their fate once the split is
    known), or with ``keep_copies`` off the rest -> Rejected.

    A group that holds ``EXISTING`` (the text is already in the DB being grown) keeps none.
    """

    def __init__(self, keep_copies: bool):
        self.keep_copies = keep_copies

    def process(self, key_docs):
        _, docs = key_docs
        if EXISTING in docs:
            for dup in (d for d in docs if d != EXISTING):
                _count(f"rejected_{EXACT_DUPLICATE}")
                yield _rejected(dup, EXACT_DUPLICATE, "same text as a document already in the DB")
            return
        docs = sorted(docs, key=lambda d: (d["source"], d["position"]))
        if self.keep_copies:
            yield {**docs[0], "copies": [(d["source"], d["position"], d["meta"]) for d in docs[1:]]}
            return
        yield docs[0]
        for dup in docs[1:]:
            _count(f"rejected_{EXACT_DUPLICATE}")
            yield _rejected(dup, EXACT_DUPLICATE, f"same text as {docs[0]['source']}:{docs[0]['position']}")


class TokenizeFn(beam.DoFn):
    """doc -> doc with ``tokens`` (LM ids + EOS, uint32 bytes) and ``split``; text is dropped.

    One document per call: ``encode_batch_fast`` of one text costs what it costs inside a batch of
    1024 (measured), and batching across elements needs ``finish_bundle`` output, which not every
    runner delivers (the Dask runner drops it)."""

    def __init__(self, tokenizer_json: str, config: ChunkConfig):
        self.tokenizer_json, self.config = tokenizer_json, config

    def setup(self):
        self.tokenizer = load_lm_tokenizer(self.tokenizer_json)
        self.eos = special_id(self.tokenizer, EOS)

    def process(self, doc):
        tokens = document_tokens(
            self.tokenizer.encode_batch_fast([doc["text"]], add_special_tokens=False)[0].ids, self.eos
        )
        _count("tokens", len(tokens))
        out = {k: v for k, v in doc.items() if k != "text"}
        out["tokens"] = tokens.tobytes()  # bytes: Beam's coder copies them without pickling
        out["split"] = split_of(doc["key"], self.config)
        yield out


class MinHashFn(beam.DoFn):
    """doc -> doc with ``dedup_sig`` and ``leakage_sig`` (MinHash over token n-grams, uint32 bytes)."""

    def __init__(self, config: ChunkConfig):
        self.config = config

    def setup(self):
        self.seeds = minhash.permutation_seeds(self.config.num_perm)

    def process(self, doc):
        c = self.config
        doc = dict(doc)
        tokens = doc_tokens(doc)
        doc["dedup_sig"] = minhash.signature(tokens, ngram=c.dedup_ngram, seeds=self.seeds).tobytes()
        doc["leakage_sig"] = minhash.signature(tokens, ngram=c.leakage_ngram, seeds=self.seeds).tobytes()
        yield doc


BUCKET_SLICES = 1024  # a large bucket's members are keyed by (band, slice) until its block count reaches them
_SLAB = 64  # left rows compared at once: bounds the comparison to 64 * right * rows bytes


def matching_pairs(left: np.ndarray, right: np.ndarray, threshold: float, *, same: bool) -> np.ndarray:
    """Index pairs (a, r) whose MinHash signatures agree on at least ``threshold`` of their rows:
    every pair of ``left`` x ``right``, or with ``same`` (left is right) every a < r. (p, 2) int"""
    found = []
    for start in range(0, len(left), _SLAB):
        equal = left[start : start + _SLAB, None, :] == right[None, :, :]  # (slab, r, rows)
        matches = equal.view(np.uint8).sum(axis=2, dtype=np.uint16)
        a, r = np.nonzero(matches / left.shape[1] >= threshold)  # minhash.estimated_jaccard
        a += start
        found.append(np.stack([a, r], axis=1)[a < r] if same else np.stack([a, r], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def tiles_of(band: bytes, key: bytes, blocks: int) -> tuple[int, list[tuple[int, int]]]:
    """A bucket member's block (by the hash of its key) and the tiles (i <= j) it belongs to: its block
    against every block, so each pair of the bucket's members meets in exactly one tile."""
    block = _unit_hash(band + key, b"block") % blocks
    return block, [(min(block, other), max(block, other)) for other in range(blocks)]


def verified_pairs(mode: str, threshold: float, left: list, right: list, *, same: bool):
    """Members (key, split, sig bytes) -> (key, key it near-duplicates) for every pair of ``left`` x ``right``
    (with ``same``, of ``left``) that passes. ``mode='dedup'``: the larger (key, split) is a duplicate of the
    smaller; ``mode='leakage'``: a train document is leaked if it matches a valid/test one."""
    if not left or not right:
        return
    sigs = [np.stack([np.frombuffer(m[2], dtype=np.uint32) for m in side]) for side in (left, right)]
    for a, r in matching_pairs(sigs[0], sigs[1], threshold, same=same):
        x, y = sorted((left[a][:2], right[r][:2]))  # (key, split)
        if mode == "dedup":
            _count(f"{mode}_{PAIRS_VERIFIED}")
            yield y[0], x[0]
        elif (x[1] == "train") != (y[1] == "train"):
            _count(f"{mode}_{PAIRS_VERIFIED}")
            train, held_out = (x, y) if x[1] == "train" else (y, x)
            yield train[0], held_out[0]


PAIR, SPILL = "pair", "spill"
# Verified pairs are counted twice: by a Beam counter where they are made (it reaches the driver with each
# bundle's result) and in the data, after the verifying stages (that count travels through its own shuffle).
# So are the matches (each document's smallest match): in the data after SmallestMatch, and by a counter in
# ApplyDrops, after the Join. A runner that loses elements on either way makes a pair of counts differ, which
# no count of documents shows (write_chunk_shards checks both).
PAIRS_VERIFIED, PAIRS_ARRIVED = "pairs_verified", "pairs_arrived"
MATCHES, MATCHES_APPLIED = "matches", "matches_applied"


class VerifyBucketFn(beam.DoFn):
    """(band, [(key, split, sig)]) -> (PAIR, (key, key it near-duplicates)) for every pair that passes, when
    the bucket has at most ``block`` members; a larger one is streamed out whole as (SPILL, ((band, slice),
    member)) for ``VerifyTileFn`` to verify in tiles. Either way at most ``block`` members are held."""

    def __init__(self, mode: str, threshold: float, block: int):
        self.mode, self.threshold, self.block = mode, threshold, block
        self.held = Metrics.distribution(COUNTERS, f"{mode}_members_held")

    def process(self, bucket):
        band, members = bucket
        members, held = iter(members), []
        for member in members:
            held.append(member)
            if len(held) > self.block:
                break
        if len(held) < 2:  # most buckets
            return
        if len(held) <= self.block:
            self.held.update(len(held))
            for pair in verified_pairs(self.mode, self.threshold, held, held, same=True):
                yield PAIR, pair
            return
        _count(f"{self.mode}_large_buckets")
        for key, split, sig in itertools.chain(held, members):
            yield SPILL, ((band, _unit_hash(band + key, b"slice") % BUCKET_SLICES), (key, split, sig))


def to_tiles(sliced):
    """((band, slice), members and the bucket's block count) -> ((band, i, j), (block, key, split, sig)) per
    tile of each member."""
    (band, _), values = sliced
    values = list(values)
    blocks = max(v for v in values if isinstance(v, int))
    for member in values:
        if not isinstance(member, int):
            block, tiles = tiles_of(band, member[0], blocks)
            for i, j in tiles:
                yield (band, i, j), (block, *member)


class VerifyTileFn(beam.DoFn):
    """((band, i, j), [(block, key, split, sig)]) -> (key, key it near-duplicates) for every pair of the
    tile that passes: block i against itself (i == j) or against block j."""

    def __init__(self, mode: str, threshold: float):
        self.mode, self.threshold = mode, threshold
        self.held = Metrics.distribution(COUNTERS, f"{mode}_members_held")

    def process(self, tile):
        (_, i, j), members = tile
        members = list(members)
        self.held.update(len(members))
        left = [m[1:] for m in members if m[0] == i]
        right = left if i == j else [m[1:] for m in members if m[0] == j]
        yield from verified_pairs(self.mode, self.threshold, left, right, same=i == j)


class ApplyDropsFn(beam.DoFn):
    """(key, {doc, near, leak}) -> the doc and its exact copies, each kept in its split, moved to
    the split "retrieval" (duplicates of a train document), or Rejected:

    - leaked (a train document matching a valid/test one): it and its copies are rejected;
    - a near-duplicate: in train, it and its copies become retrieval-only; in valid/test, rejected;
    - otherwise it is kept, and its copies become retrieval-only (train) or are rejected (valid/test).
    """

    def __init__(self, leakage_ngram: int):
        self.leakage_ngram = leakage_ngram

    def process(self, joined):
        _, groups = joined
        for mode, group in (("dedup", "near"), ("leakage", "leak")):
            if groups[group]:
                _count(f"{mode}_{MATCHES_APPLIED}")
        for doc in groups["doc"]:
            copies = doc.get("copies", ())
            doc = {k: doc[k] for k in ("key", "split", "source", "position", "meta", "tokens")}
            copies = [{**doc, "source": s, "position": p, "meta": m} for s, p, m in copies]
            if groups["leak"]:
                leak = min(groups["leak"]).hex()
                detail = f"{self.leakage_ngram}-gram Jaccard >= threshold with held-out document {leak}"
                for d in (doc, *copies):
                    _count(f"rejected_{LEAKAGE}")
                    yield _rejected(d, LEAKAGE, detail)
                continue
            near = f"near-duplicate of document {min(groups['near']).hex()}" if groups["near"] else ""
            if not near:
                yield doc
            if doc["split"] == "train":
                for d in ([doc] if near else []) + copies:
                    _count("retrieval_documents")
                    yield {**d, "split": "retrieval"}
                continue
            if near:
                _count(f"rejected_{NEAR_DUPLICATE}")
                yield _rejected(doc, NEAR_DUPLICATE, near)
            for d in copies:
                _count(f"rejected_{EXACT_DUPLICATE}")
                yield _rejected(d, EXACT_DUPLICATE, f"same text as {doc['source']}:{doc['position']}")


def id_offsets(counts: dict, config: ChunkConfig) -> dict:
    """(split, shard) -> (first doc id, first chunk id): prefix sums in (split, shard) order."""
    offsets, docs, chunks = {}, config.first_doc_id, config.first_chunk_id
    for split in SPLITS:
        for shard in range(config.shards_of(split)):
            offsets[(split, shard)] = (docs, chunks)
            n_docs, n_chunks = counts.get((split, shard), (0, 0))
            docs, chunks = docs + n_docs, chunks + n_chunks
    return offsets


def _write_parquet_atomically(table: pa.Table, path: str) -> tuple[int, str]:
    """Writes ``table`` to ``path`` via a temp file and rename; returns (bytes, sha256)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=65536, write_statistics=["chunk_id", "doc_id"])
    data = buf.getvalue()
    tmp = path + ".tmp"
    with FileSystems.create(tmp) as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])
    return len(data), hashlib.sha256(data).hexdigest()


class WriteChunkShardFn(beam.DoFn):
    """((split, shard), {docs: [doc], offsets: [(first doc id, first chunk id)]}) -> writes that shard's
    chunks and documents; yields its status."""

    def __init__(self, db: str, config: ChunkConfig, tokenizer_json: str):
        self.db, self.config, self.tokenizer_json = db, config, tokenizer_json

    def setup(self):
        tokenizer = load_lm_tokenizer(self.tokenizer_json)
        self.byte_lengths = token_byte_lengths(tokenizer)
        self.chunk_schema = layout.chunk_schema(pa.uint16() if tokenizer.get_vocab_size() <= 1 << 16 else pa.uint32())

    def process(self, joined):
        (split, shard), groups = joined
        if not groups["docs"]:  # shards without documents get no files
            return
        docs = sorted(groups["docs"], key=lambda d: (d["key"], d["source"], d["position"]))  # copies share a key
        ((doc_id, chunk_id),) = groups["offsets"]
        m = self.config.chunk_size
        chunk_cols = {name: [] for name in self.chunk_schema.names}
        doc_cols = {name: [] for name in layout.DOCUMENT_SCHEMA.names}
        for doc in docs:
            tokens = doc_tokens(doc)
            n = chunk_count(len(tokens), m)
            for name, value in (
                ("doc_id", doc_id),
                ("doc_hash", doc["key"].hex()),
                ("first_chunk_id", chunk_id),
                ("n_chunks", n),
                ("n_tokens", len(tokens)),
                ("n_bytes", int(self.byte_lengths[tokens].sum())),
                ("source", doc["source"]),
                ("position", doc["position"]),
                ("meta", doc["meta"]),
            ):
                doc_cols[name].append(value)
            for i in range(n):
                piece = tokens[i * m : (i + 1) * m]
                chunk_cols["chunk_id"].append(chunk_id + i)
                chunk_cols["doc_id"].append(doc_id)
                chunk_cols["chunk_index"].append(i)
                chunk_cols["tokens"].append(piece)
                chunk_cols["n_bytes"].append(int(self.byte_lengths[piece].sum()))
            doc_id += 1
            chunk_id += n
        chunks = pa.Table.from_pydict(
            {**chunk_cols, "tokens": [t.tolist() for t in chunk_cols["tokens"]]}, schema=self.chunk_schema
        )
        documents = pa.Table.from_pydict(doc_cols, schema=layout.DOCUMENT_SCHEMA)
        n_shards = self.config.shards_of(split)
        status = {
            "split": split,
            "shard": shard,
            "documents": len(docs),
            "chunks": chunks.num_rows,
            "tokens": int(sum(len(doc_tokens(d)) for d in docs)),
            "first_chunk_id": chunk_cols["chunk_id"][0] if docs else None,
        }
        for kind, table in ((layout.CHUNKS, chunks), (layout.DOCUMENTS, documents)):
            relative = layout.shard_relpath(split, shard, n_shards, kind)
            size, digest = _write_parquet_atomically(table, FileSystems.join(self.db, relative))
            status[f"{kind}_file"] = {"path": relative, "bytes": size, "sha256": digest, "rows": table.num_rows}
        _count("documents_kept", len(docs))
        _count("chunks_written", chunks.num_rows)
        yield status


class WriteRejectedFn(beam.DoFn):
    """((reason, part), [Rejected]) -> ``DB/rejected/<reason>-<part>.jsonl``, sorted for stable bytes."""

    def __init__(self, db: str):
        self.db = db

    def process(self, group):
        (reason, part), records = group
        lines = sorted(r.to_json() for r in records)
        path = layout.rejected_path(self.db, reason, part)
        with FileSystems.create(path) as f:
            f.write(("\n".join(lines) + "\n").encode("utf-8"))
        yield reason, len(lines)


class WriteSummaryFn(beam.DoFn):
    """(None, {stats: [(name, n)], shards: [status]}) -> ``staging``/stats.json and shards.json for the driver."""

    def __init__(self, staging: str):
        self.staging = staging

    def process(self, joined):
        _, groups = joined
        shards = sorted(groups["shards"], key=lambda x: (SPLITS.index(x["split"]), x["shard"]))
        for name, obj in (("stats.json", dict(sorted(groups["stats"]))), ("shards.json", shards)):
            with FileSystems.create(FileSystems.join(self.staging, name)) as f:
                f.write(json.dumps(obj, sort_keys=True, indent=1).encode("utf-8"))
        yield len(shards)


# ---------------------------------------------------------------------------------------------
# Composite transforms. They use only ParDo, GroupByKey, Flatten and Create (every runner's
# primitives, the Dask runner's included): no tagged outputs, no side inputs, no output from
# finish_bundle, and one leaf at the end that depends on every write.


class CountElements(beam.PTransform):
    """pcoll -> one (``name``, its number of elements), 0 for an empty one: a count that travels as data."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def expand(self, pcoll):
        name = self.name
        return (
            (pcoll | "One" >> beam.Map(lambda _: (name, 1)), pcoll.pipeline | "Zero" >> beam.Create([(name, 0)]))
            | "Marks" >> beam.Flatten()
            | "Sum" >> beam.CombinePerKey(sum)
        )


class DeadLettered(beam.PTransform):
    """A DoFn that yields kept elements or ``Rejected`` -> {'kept': ..., 'rejected': ...}."""

    def __init__(self, fn: beam.DoFn):
        super().__init__()
        self.fn = fn

    def expand(self, pcoll):
        both = pcoll | "Apply" >> beam.ParDo(self.fn)
        return {
            "kept": both | "Kept" >> beam.Filter(lambda x: not isinstance(x, Rejected)),
            "rejected": both | "Rejected" >> beam.Filter(lambda x: isinstance(x, Rejected)),
        }


class ReadCorpus(beam.PTransform):
    """(path, size) pairs -> {'kept': Record, 'rejected': Rejected}."""

    def __init__(self, files: list, config: ChunkConfig):
        super().__init__()
        self.files, self.config = files, config

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(self.files)
            | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> DeadLettered(ReadRecordsFn(self.config.text_field, self.config.max_record_bytes))
        )


def _existing_hashes(path: str):
    """A documents shard of the DB being grown -> (text hash, EXISTING) per document."""
    with FileSystems.open(path) as f:
        for text_hash in pq.read_table(f, columns=["doc_hash"])["doc_hash"].to_pylist():
            yield bytes.fromhex(text_hash), EXISTING


class HeldOutSignaturesFn(beam.DoFn):
    """A valid/test chunk shard of the DB being grown -> one leakage signature per document (its
    chunks' tokens joined in order), so that added documents are leakage-filtered against it."""

    def __init__(self, config: ChunkConfig):
        self.config = config

    def setup(self):
        self.seeds = minhash.permutation_seeds(self.config.num_perm)

    def process(self, path: str):
        with FileSystems.open(path) as f:
            table = pq.read_table(f, columns=["doc_id", "chunk_index", "tokens"])
        if not table.num_rows:
            return
        # a document's chunks are in one shard
        order = np.lexsort((table["chunk_index"].to_numpy(), table["doc_id"].to_numpy()))
        docs, tokens = table["doc_id"].to_numpy()[order], table["tokens"].to_pylist()
        starts = np.flatnonzero(np.r_[True, np.diff(docs) != 0])  # each document's first row in ``order``
        for start, end in zip(starts, np.r_[starts[1:], len(order)]):
            joined = np.concatenate([np.asarray(tokens[r], dtype=np.uint32) for r in order[start:end]])
            sig = minhash.signature(joined, ngram=self.config.leakage_ngram, seeds=self.seeds).tobytes()
            yield {"key": f"db-doc-{docs[start]}".encode(), "split": layout.split_of(path), "leakage_sig": sig}


class ExactDedup(beam.PTransform):
    """doc -> {'kept': one doc per distinct normalised text, 'rejected': the others}; with
    ``keep_copies`` the others ride on the kept doc as its ``copies`` instead.

    ``existing``: globs of a DB's ``documents`` Parquet shards; texts already there are dropped too
    (a shuffle join on the text hash, so it scales with the DB).
    """

    def __init__(self, existing: list[str] = (), keep_copies: bool = False):
        super().__init__()
        self.existing, self.keep_copies = list(existing), keep_copies

    def expand(self, docs):
        keyed = docs | "ByTextHash" >> beam.Map(lambda d: (d["key"], d))
        if self.existing:
            # files listed here and read by a ParDo: Beam's Parquet source is a splittable DoFn,
            # which not every runner executes (the Dask runner does not)
            files = sorted(m.path for result in FileSystems.match(self.existing) for m in result.metadata_list)
            known = (
                docs.pipeline
                | "ExistingFiles" >> beam.Create(files)
                | "ExistingHashes" >> beam.FlatMap(_existing_hashes)
            )
            keyed = (keyed, known) | "WithExisting" >> beam.Flatten()
        return (
            keyed | "GroupByTextHash" >> beam.GroupByKey() | "KeepFirst" >> DeadLettered(KeepFirstFn(self.keep_copies))
        )


class FindNearDuplicates(beam.PTransform):
    """docs with signatures -> {'matches': (key, smallest key it matches), 'counts': (name, pairs verified), (name,
    matches)}:
    every pair of documents that shares an LSH band and whose signatures agree on ``threshold`` of their rows,
    whatever the bucket's size. A bucket larger than
    ``bucket_block`` is streamed out of its group, cut into blocks by key hash and verified in tiles of two
    blocks (every pair in exactly one tile), so no DoFn holds more than about two blocks of any bucket.

    ``mode='dedup'`` bands per split (near-duplicates are removed within a split) and uses
    ``dedup_sig``; ``mode='leakage'`` bands across splits and uses ``leakage_sig``.
    """

    def __init__(self, config: ChunkConfig, mode: str):
        super().__init__()
        self.config, self.mode = config, mode

    def expand(self, docs):
        c, mode = self.config, self.mode
        sig_field = "dedup_sig" if mode == "dedup" else "leakage_sig"
        threshold = c.dedup_threshold if mode == "dedup" else c.leakage_threshold

        def bands(doc):
            prefix = doc["split"].encode() if mode == "dedup" else b""
            sig = np.frombuffer(doc[sig_field], dtype=np.uint32)
            for band in minhash.band_keys(sig, bands=c.lsh_bands, rows=c.lsh_rows):
                yield prefix + band, (doc["key"], doc["split"], doc[sig_field])

        verified = (
            docs
            | "Bands" >> beam.FlatMap(bands)
            | "GroupByBand" >> beam.GroupByKey()
            | "Verify" >> beam.ParDo(VerifyBucketFn(mode, threshold, c.bucket_block))
        )
        # buckets larger than a block: their size reaches their members through slices of them (no side input:
        # the Dask runner recomputes one's whole input in every task), then blocks meet in tiles
        spilled = verified | "Spilled" >> beam.FlatMap(lambda out: [out[1]] if out[0] == SPILL else [])
        blocks = (
            spilled
            | "OnePerMember" >> beam.Map(lambda kv: (kv[0][0], 1))
            | "BucketSizes" >> beam.CombinePerKey(sum)
            | "BlockCounts"
            >> beam.FlatMap(lambda kv: [((kv[0], s), -(-kv[1] // c.bucket_block)) for s in range(BUCKET_SLICES)])
        )
        in_tiles = (
            (spilled, blocks)
            | "WithBlockCounts" >> beam.Flatten()
            | "GroupBySlice" >> beam.GroupByKey()
            | "ToTiles" >> beam.FlatMap(to_tiles)
            | "GroupByTile" >> beam.GroupByKey()
            | "VerifyTiles" >> beam.ParDo(VerifyTileFn(mode, threshold))
        )
        pairs = (
            verified | "Pairs" >> beam.FlatMap(lambda out: [out[1]] if out[0] == PAIR else []),
            in_tiles,
        ) | "AllPairs" >> beam.Flatten()
        matches = pairs | "SmallestMatch" >> beam.CombinePerKey(min)
        counts = (
            pairs | "CountPairs" >> CountElements(f"{mode}_{PAIRS_ARRIVED}"),
            matches | "CountMatches" >> CountElements(f"{mode}_{MATCHES}"),
        ) | "Counts" >> beam.Flatten()
        return {"matches": matches, "counts": counts}


class Deduplicate(beam.PTransform):
    """Tokenized docs -> {'kept': kept, 'rejected': near-duplicates and leaked train docs, 'pairs': pair and match
    counts}.

    ``held_out``: valid/test chunk shards of an existing DB (growing it): train documents that match
    one of its documents are leaked too.
    """

    def __init__(self, config: ChunkConfig, held_out: list[str] = ()):
        super().__init__()
        self.config, self.held_out = config, list(held_out)

    def expand(self, docs):
        signed = docs | "MinHash" >> beam.ParDo(MinHashFn(self.config))
        near = signed | "NearDuplicates" >> FindNearDuplicates(self.config, "dedup")
        candidates = signed
        if self.held_out:
            existing = (
                docs.pipeline
                | "HeldOutShards" >> beam.Create(self.held_out)
                | "HeldOutSignatures" >> beam.ParDo(HeldOutSignaturesFn(self.config))
            )
            candidates = (signed, existing) | "WithHeldOut" >> beam.Flatten()
        leak = candidates | "Leakage" >> FindNearDuplicates(self.config, "leakage")
        keyed = signed | "ByKey" >> beam.Map(lambda d: (d["key"], d))
        applied = (
            {"doc": keyed, "near": near["matches"], "leak": leak["matches"]}
            | "Join" >> beam.CoGroupByKey()
            | "ApplyDrops" >> DeadLettered(ApplyDropsFn(self.config.leakage_ngram))
        )
        return {**applied, "pairs": (near["counts"], leak["counts"]) | "PairCounts" >> beam.Flatten()}


class WriteChunkShards(beam.PTransform):
    """Kept docs -> chunk and document Parquet shards under DB; outputs per-shard statuses."""

    def __init__(self, db: str, config: ChunkConfig, tokenizer_json: str):
        super().__init__()
        self.db, self.config, self.tokenizer_json = db, config, tokenizer_json

    def expand(self, docs):
        c = self.config
        by_shard = docs | "ByShard" >> beam.Map(lambda d: ((d["split"], shard_of(d["key"], d["split"], c)), d))
        # ids of a shard start at the prefix sums of all shards' sizes: the few sizes meet on one key,
        # and each shard's offsets reach its documents by a join
        offsets = (
            by_shard
            | "ShardSizes" >> beam.Map(lambda kv: (kv[0], (1, chunk_count(len(doc_tokens(kv[1])), c.chunk_size))))
            | "SumShardSizes" >> beam.CombinePerKey(lambda pairs: tuple(map(sum, zip(*pairs))) if pairs else (0, 0))
            | "OneKey" >> beam.Map(lambda kv: (None, kv))
            | "AllSizes" >> beam.GroupByKey()
            | "Offsets" >> beam.FlatMap(lambda kv: id_offsets(dict(kv[1]), c).items())
        )
        return (
            {"docs": by_shard, "offsets": offsets}
            | "JoinOffsets" >> beam.CoGroupByKey()
            | "WriteShard" >> beam.ParDo(WriteChunkShardFn(self.db, c, self.tokenizer_json))
        )


class WriteRejected(beam.PTransform):
    """Rejected -> ``DB/rejected/<reason>-<part>.jsonl``; outputs (reason, count)."""

    def __init__(self, db: str, parts: int):
        super().__init__()
        self.db, self.parts = db, parts

    def expand(self, rejected):
        parts = self.parts
        return (
            rejected
            | "ByReason" >> beam.Map(lambda r: ((r.reason, _unit_hash(r.source.encode(), b"rejected") % parts), r))
            | "GroupByReason" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteRejectedFn(self.db))
            | "SumByReason" >> beam.CombinePerKey(sum)
        )


def build_chunk_pipeline(
    p: beam.Pipeline,
    *,
    inputs: list,
    db: str,
    config: ChunkConfig,
    tokenizer_json: str,
    staging: str,
    existing_documents: list[str] = (),
    held_out: list[str] = (),
) -> None:
    """Adds stage 1 over ``inputs`` [(path, size)] to ``p``. Its statistics land in ``staging``/stats.json and
    shards.json. ``existing_documents``/``held_out``: a grown DB's document shards (exact duplicates) and valid/test
    chunk shards (leakage)."""
    read = p | "ReadCorpus" >> ReadCorpus(inputs, config)
    normalized = read["kept"] | "Normalize" >> DeadLettered(NormalizeFn())
    unique = normalized["kept"] | "ExactDedup" >> ExactDedup(
        existing_documents, keep_copies=config.retrieval_duplicates
    )
    tokenized = unique["kept"] | "Tokenize" >> beam.ParDo(TokenizeFn(tokenizer_json, config))
    kept = tokenized | "Deduplicate" >> Deduplicate(config, held_out)
    statuses = kept["kept"] | "WriteChunkShards" >> WriteChunkShards(db, config, tokenizer_json)
    rejected = (
        read["rejected"],
        normalized["rejected"],
        unique["rejected"],
        kept["rejected"],
    ) | "AllRejected" >> beam.Flatten()
    rejected_counts = rejected | "WriteRejected" >> WriteRejected(db, config.rejected_shards)
    records_read = (
        (read["kept"], read["rejected"]) | "AllRead" >> beam.Flatten() | "CountRead" >> CountElements("records_read")
    )
    stats = (
        records_read,
        rejected_counts | "RejectedKeys" >> beam.Map(lambda kv: (f"rejected_{kv[0]}", kv[1])),
        kept["pairs"],
    ) | "AllCounts" >> beam.Flatten()
    (
        {
            "stats": stats | "StatsOnOneKey" >> beam.Map(lambda kv: (None, kv)),
            "shards": statuses | "ShardsOnOneKey" >> beam.Map(lambda x: (None, x)),
        }
        | "Summary" >> beam.CoGroupByKey()
        | "WriteSummary" >> beam.ParDo(WriteSummaryFn(staging))
    )


# ---------------------------------------------------------------------------------------------
# The stage: tokenizer, resumability, manifest.


# Runners Beam ships but does not know by their short name.
RUNNER_PATHS = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


def local_beam_options(beam_args: list[str]):
    """Beam options; without --runner, the local FnApiRunner on every core (never Prism,
    which downloads a binary and fails offline). ``--runner=DaskRunner`` runs on the dask.distributed
    cluster at ``--dask_client_address``."""
    args = []
    for arg in beam_args:
        name, _, runner = arg.partition("=")
        args.append(f"--runner={RUNNER_PATHS[runner]}" if name == "--runner" and runner in RUNNER_PATHS else arg)
    if not any(a.startswith("--runner") for a in args):
        args += [
            "--runner=FnApiRunner",
            f"--direct_num_workers={os.cpu_count() or 1}",
            "--direct_running_mode=multi_processing",
        ]
    return PipelineOptions(args)


def sample_texts(files: list, config: ChunkConfig, sample_bytes: int):
    """The first ``sample_bytes`` of normalised text in sorted file order (deterministic)."""
    seen = 0
    for path, size in files:
        for item in corpus_io.read_records(
            path, size, text_field=config.text_field, max_record_bytes=config.max_record_bytes
        ):
            if isinstance(item, Record) and (text := normalize_text(item.text)):
                yield text
                seen += len(text)
                if seen >= sample_bytes:
                    return


def pair_counters(result) -> dict[str, int] | None:
    """The Beam counters of verified pairs and applied matches per mode, or None where the runner reports no
    metrics (Dask)."""
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(COUNTERS))["counters"]
    except NotImplementedError:
        return None
    names = [f"{mode}_{name}" for mode in ("dedup", "leakage") for name in (PAIRS_VERIFIED, MATCHES_APPLIED)]
    return {
        name: sum(
            c.committed if c.committed is not None else c.attempted for c in counters if c.key.metric.name == name
        )
        for name in names
    }


def check_pairs_arrived(counters: dict[str, int] | None, counts: dict) -> None:
    """Raises when fewer verified pairs reached the count after the verifying stages than were verified, or fewer
    matches reached the drop decisions than SmallestMatch made (``counters`` from ``pair_counters``, ``counts``
    the data's own): the runner lost elements between stages, and leaks or near-duplicates would stay in the DB
    unseen by any document count. More downstream than upstream is a bundle run twice (at-least-once), which
    the smallest match absorbs."""
    if counters is None:
        log.info("chunks: this runner reports no metrics; verified pairs and matches were not counted twice")
        return
    made_got = {}  # what was made upstream and what got downstream, named as in the manifest's counts
    for mode in ("dedup", "leakage"):
        pairs, matches = f"{mode}_{PAIRS_ARRIVED}", f"{mode}_{MATCHES}"
        made_got[pairs] = counters[f"{mode}_{PAIRS_VERIFIED}"], counts.get(pairs, 0)
        made_got[matches] = counts.get(matches, 0), counters[f"{mode}_{MATCHES_APPLIED}"]
    lost = {name: made - got for name, (made, got) in made_got.items() if got < made}
    if lost:
        raise RuntimeError(
            f"chunks: the runner lost verified pairs or matches between stages {lost} (counters {counters}, "
            f"counted in the data { {k: v for k, v in counts.items() if PAIRS_ARRIVED in k or MATCHES in k} }); "
            "nothing was recorded, run the stage again"
        )


def write_chunk_shards(
    corpus: list[str],
    db: str,
    *,
    config: ChunkConfig | None = None,
    tokenizer_path: str | None = None,
    vocab_size: int = 8192,
    tokenizer_sample_bytes: int = 64 << 20,
    beam_args: list[str] = (),
    overwrite: bool = False,
    existing_documents: str | None = None,
) -> dict:
    """Runs stage 1 into ``db`` and returns its manifest record (skipped when already complete).

    ``existing_documents``: a DB (growing it) whose documents, and its increments', are dropped
    as exact duplicates, and whose valid/test documents leak-filter the new ones.
    """
    config = config or ChunkConfig()
    files = corpus_io.match_input_files(corpus)
    inputs = [[path, size] for path, size, _ in files]
    if tokenizer_path:
        tokenizer_json = tokenizer_for_db(tokenizer_path).to_str()
        tokenizer_fingerprint = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    else:
        tokenizer_fingerprint = f"trained:vocab_size={vocab_size},sample_bytes={tokenizer_sample_bytes}"
    # sizes and modification times: an input edited in place, even to the same size, is a new corpus
    fingerprints = {
        "inputs": inputs,
        "inputs_modified": [modified for _, _, modified in files],
        "tokenizer_sha256": tokenizer_fingerprint,
    }
    stage = Stage(db, "chunks", config, fingerprints=fingerprints, overwrite=overwrite)
    if stage.state == "complete":
        shards = stage.previous["shards"]
        if done := stage.finished(
            [storage.join(db, s[k]["path"]) for s in shards for k in ("chunks_file", "documents_file")]
        ):
            return done
    stage.start(
        wipe=[
            storage.join(db, kind)
            for kind in (layout.CHUNKS, layout.DOCUMENTS, layout.REJECTED, layout.DELETED, layout.INCREMENTS)
        ]
    )

    if not tokenizer_path:
        log.info(
            "training the LM tokenizer (vocab %d) on up to %d MB of the corpus",
            vocab_size,
            tokenizer_sample_bytes >> 20,
        )
        tokenizer_json = train_lm_tokenizer(
            sample_texts(inputs, config, tokenizer_sample_bytes), vocab_size=vocab_size
        ).to_str()
    storage.write_atomically(layout.tokenizer_path(db), tokenizer_json.encode("utf-8"))

    staging = storage.join(db, layout.STAGING_CHUNKS)
    total_bytes = sum(size for _, size in inputs)
    log.info("chunks: %d files, %.1f MB -> %s", len(inputs), total_bytes / 1e6, db)
    options = local_beam_options(list(beam_args))
    with beam.Pipeline(options=options) as p:
        existing = (
            [layout.documents_glob(root) for root in mf.db_roots(existing_documents)] if existing_documents else []
        )
        held_out = layout.chunk_shard_files(existing_documents, layout.HELD_OUT_SPLITS) if existing_documents else []
        build_chunk_pipeline(
            p,
            inputs=inputs,
            db=db,
            config=config,
            tokenizer_json=tokenizer_json,
            staging=staging,
            existing_documents=existing,
            held_out=held_out,
        )
    if options.view_as(StandardOptions).runner == RUNNER_PATHS["DaskRunner"]:
        # the runner leaves its distributed Client open, reconnecting (and logging) once the cluster goes
        import distributed

        distributed.default_client().close()

    counts = json.loads(storage.read_bytes(storage.join(staging, "stats.json")))
    shards = json.loads(storage.read_bytes(storage.join(staging, "shards.json")))
    delete_tree(staging)
    check_pairs_arrived(pair_counters(p.result), counts)
    for key in ("documents", "chunks", "tokens"):
        counts[f"{key}_kept" if key == "documents" else key] = sum(s[key] for s in shards)
    counts["by_split"] = {
        split: {key: sum(s[key] for s in shards if s["split"] == split) for key in ("documents", "chunks", "tokens")}
        for split in SPLITS
    }
    rejected_total = sum(v for k, v in counts.items() if k.startswith("rejected_"))
    counts["balanced"] = counts.get("records_read", 0) == counts["documents_kept"] + rejected_total
    if not counts["balanced"]:
        raise RuntimeError(f"chunks: counts do not add up: {counts}")
    if counts["chunks"] == 0:
        log.warning(
            "chunks: the corpus produced no chunks (%s)", {k: v for k, v in counts.items() if k.startswith("rejected_")}
        )
    return stage.complete(
        counts=counts,
        shards=shards,
        tokenizer_sha256=storage.sha256_file(layout.tokenizer_path(db)),
        versions=mf.package_versions("apache-beam", "pyarrow", "tokenizers", "numpy"),
    )
