"""Corpus files for the build pipeline: matched and opened through Beam's ``FileSystems``, so local
paths, ``gs://``, ``s3://`` and ``hdfs://`` all work; formats and records are ``retro_db.corpus``.
"""

from __future__ import annotations

from typing import Iterator

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from retro_db.corpus import Record, Rejected, is_hidden
from retro_db.corpus import read_records as _read_records


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
    return [m for r in results for m in r.metadata_list if not is_hidden(m.path)]


def open_beam(path: str, decompress: bool):
    return FileSystems.open(
        path, compression_type=CompressionTypes.AUTO if decompress else CompressionTypes.UNCOMPRESSED
    )


def read_records(
    path: str, size: int, *, text_field: str = "text", max_record_bytes: int = 8 << 20
) -> Iterator[Record | Rejected]:
    """``retro_db.corpus.read_records`` through Beam's filesystems."""
    return _read_records(path, size, text_field=text_field, max_record_bytes=max_record_bytes, open_file=open_beam)
