"""Corpus files as the DB reads them, without Beam: records, dead letters, and a document's rules.

Formats, chosen by file name:
- ``*.jsonl``, ``*.json``, ``*.jsonl.zst``, ``*.json.zst``, ``*.zst``: one JSON object per line
  (the Pile's layout: ``text`` + ``meta``);
- ``*.parquet``: one record per row of the text column;
- anything else: plain UTF-8 text, one record per file.

Lines are read with a hard length bound, so a single huge record cannot exhaust memory: it is
skipped to its end and rejected. Files are opened by an ``Opener``: local files here; the build
pipeline passes Beam's ``FileSystems`` (``gs://``, ``s3://``, ``hdfs://``).

A document, once read, is normalised (``normalize_text``), keyed by the hash of that text
(``document_key``: the DB's ``doc_hash``), tokenized with ``<|endoftext|>`` appended and cut into
chunks of m tokens, the last one padded (``chunk_count``). Evaluation reads any text by these
same rules, so its chunks are what the DB would have made of it.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import BinaryIO, Callable, ContextManager, Iterator

import numpy as np
import pyarrow.parquet as pq
import zstandard

Opener = Callable[[str, bool], ContextManager[BinaryIO]]  # (path, decompress by extension) -> binary file

READ_BLOCK_BYTES = 1 << 20

# Reasons a record is rejected; they name the counters and the dead-letter files.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_a_json_object"
INVALID_UTF8 = "invalid_utf8"
MISSING_TEXT = "missing_text"
TEXT_NOT_STRING = "text_not_string"
RECORD_TOO_LARGE = "record_too_large"
TRUNCATED_STREAM = "truncated_stream"
UNREADABLE_FILE = "unreadable_file"
EMPTY_FILE = "empty_file"


@dataclass(frozen=True)
class Record:
    """One document as read: where it came from and its raw text."""

    source: str
    position: int  # 1-based line (JSONL), 0-based row (Parquet), 0 (plain text)
    text: str
    meta: str  # the record's ``meta`` as canonical JSON, "" when absent


@dataclass(frozen=True)
class Rejected:
    """A dead letter: the record (or file) that could not be used, and why."""

    source: str
    position: int
    reason: str
    detail: str
    excerpt: str = ""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False, sort_keys=True)


class TruncatedStream(Exception):
    pass


def input_format(path: str) -> str:
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".jsonl.zst", ".json.zst", ".zst", ".ndjson")):
        return "jsonl"
    return "text"


def _raw_blocks(f: BinaryIO) -> Iterator[bytes]:
    while block := f.read(READ_BLOCK_BYTES):
        yield block


def _zstd_blocks(f: BinaryIO) -> Iterator[bytes]:
    """Decompresses a (multi-frame) zstd stream; raises TruncatedStream if it ends mid-frame.

    zstandard's stream_reader silently returns a short read on a truncated file, so frames
    are tracked here explicitly.
    """
    decompressor = zstandard.ZstdDecompressor()
    dobj, pending = decompressor.decompressobj(), False
    for block in _raw_blocks(f):
        while block:
            out = dobj.decompress(block)
            pending = True
            if out:
                yield out
            if dobj.eof:
                block, dobj, pending = dobj.unused_data, decompressor.decompressobj(), False
            else:
                block = b""
    if pending:
        raise TruncatedStream("zstd stream ends in the middle of a frame")


def iter_lines(blocks: Iterator[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Splits byte blocks into lines: (1-based line number, line or None if oversize, length).

    An oversize line is never held in memory: its bytes are counted and dropped.
    """
    lineno, buf, size = 0, bytearray(), 0
    for block in blocks:
        start = 0
        while True:
            nl = block.find(b"\n", start)
            piece = block[start:] if nl < 0 else block[start:nl]
            size += len(piece)
            if size <= max_line_bytes:
                buf += piece
            else:
                buf.clear()
            if nl < 0:
                break
            lineno += 1
            yield lineno, (bytes(buf) if size <= max_line_bytes else None), size
            buf.clear()
            size = 0
            start = nl + 1
    if size:
        yield lineno + 1, (bytes(buf) if size <= max_line_bytes else None), size


def _excerpt(raw: bytes | str, n: int = 200) -> str:
    if isinstance(raw, bytes):
        raw = raw[:n].decode("utf-8", errors="replace")
    return raw[:n]


def parse_json_line(source: str, lineno: int, line: bytes, text_field: str) -> Record | Rejected:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejected(source, lineno, INVALID_UTF8, f"invalid UTF-8 at byte {e.start}", _excerpt(line))
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        return Rejected(source, lineno, MALFORMED_JSON, f"{e.msg} at column {e.colno}", _excerpt(decoded))
    if not isinstance(obj, dict):
        return Rejected(source, lineno, NOT_AN_OBJECT, f"line holds a JSON {type(obj).__name__}", _excerpt(decoded))
    if text_field not in obj:
        return Rejected(source, lineno, MISSING_TEXT, f"no {text_field!r} field", _excerpt(decoded))
    text = obj[text_field]
    if not isinstance(text, str):
        return Rejected(
            source, lineno, TEXT_NOT_STRING, f"{text_field!r} is a {type(text).__name__}", _excerpt(decoded)
        )
    meta = obj.get("meta")
    return Record(source, lineno, text, "" if meta is None else json.dumps(meta, sort_keys=True, ensure_ascii=False))


def read_jsonl(path: str, *, text_field: str, max_record_bytes: int, open_file: Opener) -> Iterator[Record | Rejected]:
    with open_file(path, False) as f:
        blocks = _zstd_blocks(f) if path.lower().endswith(".zst") else _raw_blocks(f)
        last = 0
        try:
            for lineno, line, size in iter_lines(blocks, max_record_bytes):
                last = lineno
                if line is None:
                    yield Rejected(
                        path,
                        lineno,
                        RECORD_TOO_LARGE,
                        f"line of {size} bytes exceeds max_record_bytes={max_record_bytes}",
                    )
                elif line.strip():
                    yield parse_json_line(path, lineno, line, text_field)
        except TruncatedStream as e:
            yield Rejected(path, last + 1, TRUNCATED_STREAM, f"{e}; lines 1..{last} were read, the rest is lost")


def read_parquet(
    path: str, *, text_field: str, max_record_bytes: int, open_file: Opener
) -> Iterator[Record | Rejected]:
    with open_file(path, False) as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            yield Rejected(path, 0, MISSING_TEXT, f"no column {text_field!r} (columns: {pf.schema_arrow.names})")
            return
        columns = [text_field] + (["meta"] if "meta" in pf.schema_arrow.names and text_field != "meta" else [])
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            texts = batch.column(0).to_pylist()
            metas = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
            for text, meta in zip(texts, metas):
                if text is None:
                    yield Rejected(path, row, MISSING_TEXT, f"{text_field!r} is null")
                elif not isinstance(text, str):
                    yield Rejected(path, row, TEXT_NOT_STRING, f"{text_field!r} is a {type(text).__name__}")
                elif len(text) > max_record_bytes:
                    yield Rejected(
                        path,
                        row,
                        RECORD_TOO_LARGE,
                        f"text of {len(text)} characters exceeds max_record_bytes={max_record_bytes}",
                    )
                else:
                    yield Record(
                        path,
                        row,
                        text,
                        "" if meta is None else json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str),
                    )
                row += 1


def read_text(path: str, *, max_record_bytes: int, size: int, open_file: Opener) -> Iterator[Record | Rejected]:
    if size > max_record_bytes:
        yield Rejected(path, 0, RECORD_TOO_LARGE, f"file of {size} bytes exceeds max_record_bytes={max_record_bytes}")
        return
    with open_file(path, True) as f:
        raw = f.read()
    try:
        yield Record(path, 0, raw.decode("utf-8"), "")
    except UnicodeDecodeError as e:
        yield Rejected(path, 0, INVALID_UTF8, f"invalid UTF-8 at byte {e.start}", _excerpt(raw))


def read_records(
    path: str, size: int, *, text_field: str = "text", max_record_bytes: int = 8 << 20, open_file: Opener | None = None
) -> Iterator[Record | Rejected]:
    """Every record of one file, or a Rejected for each record (or the file) that is unusable.
    ``open_file``: how to open it (default: a local file)."""
    open_file = open_file or open_local
    if size == 0:
        yield Rejected(path, 0, EMPTY_FILE, "file is empty")
        return
    fmt = input_format(path)
    try:
        if fmt == "jsonl":
            yield from read_jsonl(path, text_field=text_field, max_record_bytes=max_record_bytes, open_file=open_file)
        elif fmt == "parquet":
            yield from read_parquet(path, text_field=text_field, max_record_bytes=max_record_bytes, open_file=open_file)
        else:
            yield from read_text(path, max_record_bytes=max_record_bytes, size=size, open_file=open_file)
    except (OSError, ValueError, zstandard.ZstdError) as e:  # pyarrow's errors are OSError/ValueError
        yield Rejected(path, 0, UNREADABLE_FILE, f"{type(e).__name__}: {e}")


def is_hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/")[-3:] if part)


def match_local(patterns: list[str]) -> list[tuple[str, int]]:
    """Local files, directories (recursively) and globs -> sorted (path, size); hidden files left out.
    Raises FileNotFoundError naming every pattern that matched nothing."""
    found, missing = {}, []
    for pattern in patterns:
        paths = [
            p
            for p in (
                glob.glob(os.path.join(pattern, "**"), recursive=True) if os.path.isdir(pattern) else glob.glob(pattern)
            )
            if os.path.isfile(p) and not is_hidden(p)
        ]
        if not paths:
            missing.append(pattern)
        found.update((p, os.path.getsize(p)) for p in paths)
    if missing:
        raise FileNotFoundError(f"no corpus files match {', '.join(repr(p) for p in missing)}")
    return sorted(found.items())


def open_local(path: str, decompress: bool) -> BinaryIO:
    """A local file; with ``decompress``, .gz/.bz2/.xz are read decompressed (as Beam's AUTO does)."""
    if decompress:
        for suffix, module in ((".gz", gzip), (".bz2", bz2), (".xz", lzma)):
            if path.lower().endswith(suffix):
                return module.open(path, "rb")
    return open(path, "rb")


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc but tab and newline


def normalize_text(text: str) -> str:
    """NFC, Unix newlines, no control characters but tab and newline, no surrounding blanks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return _CONTROL.sub("", text).strip()


def document_key(normalized_text: str) -> bytes:
    """A document's identity: equal keys, equal normalised texts (the DB stores it as ``doc_hash``)."""
    return hashlib.blake2b(normalized_text.encode("utf-8"), digest_size=16).digest()


def document_tokens(ids: list[int], eos: int) -> np.ndarray:
    """A document's LM tokens: its text's ids and ``<|endoftext|>``. (t + 1,) uint32"""
    tokens = np.empty(len(ids) + 1, dtype=np.uint32)
    tokens[:-1] = ids
    tokens[-1] = eos
    return tokens


def chunk_count(n_tokens: int, chunk_size: int) -> int:
    return -(-n_tokens // chunk_size)
