"""Reading corpus files into records, with every bad record turned into a dead letter.

Formats, chosen by file name:
- ``*.jsonl``, ``*.json``, ``*.jsonl.zst``, ``*.json.zst``, ``*.zst``: one JSON object per line
  (the Pile's layout: ``text`` + ``meta``);
- ``*.parquet``: one record per row of the text column;
- anything else: plain UTF-8 text, one record per file.

Files are opened through Beam's ``FileSystems`` so local paths, ``gs://``, ``s3://`` and
``hdfs://`` all work. Lines are read with a hard length bound, so a single huge record cannot
exhaust a worker's memory: it is skipped to its end and rejected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

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


def match_input_files(patterns: list[str]) -> list[tuple[str, int, float]]:
    """Expands files, directories (recursively), globs and URIs into sorted (path, size, last
    modified in seconds) triples, from one listing of each pattern.

    Raises FileNotFoundError naming every pattern that matched nothing.
    """
    found: dict[str, tuple[int, float]] = {}
    missing = []
    for pattern in patterns:
        metadata = _match(FileSystems.join(pattern.rstrip("/"), "**"))  # a directory, recursively
        if not metadata:
            metadata = _match(pattern)
        if not metadata:
            missing.append(pattern)
        for m in metadata:
            found[m.path] = (m.size_in_bytes, m.last_updated_in_seconds)
    if missing:
        raise FileNotFoundError(f"no corpus files match {', '.join(repr(p) for p in missing)}")
    return [(path, size, modified) for path, (size, modified) in sorted(found.items())]


def match_inputs(patterns: list[str]) -> list[tuple[str, int]]:
    """Sorted (path, size) pairs of ``match_input_files``."""
    return [(path, size) for path, size, _ in match_input_files(patterns)]


def _match(pattern: str) -> list:
    try:
        results = FileSystems.match([pattern])
    except Exception:  # Beam raises BeamIOError for a pattern with no match on some filesystems
        return []
    return [m for r in results for m in r.metadata_list if not _is_hidden(m.path)]


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/")[-3:] if part)


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
        return Rejected(source, lineno, TEXT_NOT_STRING, f"{text_field!r} is a {type(text).__name__}", _excerpt(decoded))
    meta = obj.get("meta")
    return Record(source, lineno, text, "" if meta is None else json.dumps(meta, sort_keys=True, ensure_ascii=False))


def read_jsonl(path: str, *, text_field: str, max_record_bytes: int) -> Iterator[Record | Rejected]:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        blocks = _zstd_blocks(f) if path.lower().endswith(".zst") else _raw_blocks(f)
        last = 0
        try:
            for lineno, line, size in iter_lines(blocks, max_record_bytes):
                last = lineno
                if line is None:
                    yield Rejected(path, lineno, RECORD_TOO_LARGE, f"line of {size} bytes exceeds max_record_bytes={max_record_bytes}")
                elif line.strip():
                    yield parse_json_line(path, lineno, line, text_field)
        except TruncatedStream as e:
            yield Rejected(path, last + 1, TRUNCATED_STREAM, f"{e}; lines 1..{last} were read, the rest is lost")


def read_parquet(path: str, *, text_field: str, max_record_bytes: int) -> Iterator[Record | Rejected]:
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
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
                    yield Rejected(path, row, RECORD_TOO_LARGE, f"text of {len(text)} characters exceeds max_record_bytes={max_record_bytes}")
                else:
                    yield Record(path, row, text, "" if meta is None else json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str))
                row += 1


def read_text(path: str, *, max_record_bytes: int, size: int) -> Iterator[Record | Rejected]:
    if size > max_record_bytes:
        yield Rejected(path, 0, RECORD_TOO_LARGE, f"file of {size} bytes exceeds max_record_bytes={max_record_bytes}")
        return
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
        raw = f.read()
    try:
        yield Record(path, 0, raw.decode("utf-8"), "")
    except UnicodeDecodeError as e:
        yield Rejected(path, 0, INVALID_UTF8, f"invalid UTF-8 at byte {e.start}", _excerpt(raw))


def read_records(path: str, size: int, *, text_field: str = "text", max_record_bytes: int = 8 << 20) -> Iterator[Record | Rejected]:
    """Every record of one file, or a Rejected for each record (or the file) that is unusable."""
    if size == 0:
        yield Rejected(path, 0, EMPTY_FILE, "file is empty")
        return
    fmt = input_format(path)
    try:
        if fmt == "jsonl":
            yield from read_jsonl(path, text_field=text_field, max_record_bytes=max_record_bytes)
        elif fmt == "parquet":
            yield from read_parquet(path, text_field=text_field, max_record_bytes=max_record_bytes)
        else:
            yield from read_text(path, max_record_bytes=max_record_bytes, size=size)
    except (OSError, ValueError, zstandard.ZstdError) as e:  # pyarrow's errors are OSError/ValueError
        yield Rejected(path, 0, UNREADABLE_FILE, f"{type(e).__name__}: {e}")
