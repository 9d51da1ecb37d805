"""Reading every input format, and every kind of bad input becoming a dead letter."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import corpus_io
from retro_db import corpus
from retro_db.corpus import Record, Rejected


@pytest.fixture(params=["beam", "local"])
def read_all(request):
    """Every record of a file, read as the build pipeline reads it (Beam's filesystems) and as evaluation does
    (local files)."""
    import os

    read = corpus_io.read_records if request.param == "beam" else corpus.read_records
    return lambda path, **kw: list(read(str(path), os.path.getsize(path), **kw))


def test_jsonl_records_keep_line_numbers_and_meta(read_all, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one", "meta": {"pile_set_name": "X"}}\n\n{"text": "two"}\n')
    out = read_all(path)
    assert out == [Record(str(path), 1, "one", '{"pile_set_name": "X"}'), Record(str(path), 3, "two", "")]


@pytest.mark.parametrize(
    "line, reason",
    [
        (b'{"text": "unterminated', corpus.MALFORMED_JSON),
        (b'{"text": "caf\xe9"}', corpus.INVALID_UTF8),
        (b'{"body": "no text field"}', corpus.MISSING_TEXT),
        (b'{"text": 42}', corpus.TEXT_NOT_STRING),
        (b'["a", "list"]', corpus.NOT_AN_OBJECT),
    ],
)
def test_bad_jsonl_line_is_rejected_with_file_line_and_reason(read_all, tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good"}\n' + line + b'\n{"text": "after"}\n')
    out = read_all(path)
    assert [type(x) for x in out] == [Record, Rejected, Record]
    assert out[1].source == str(path) and out[1].position == 2 and out[1].reason == reason
    assert out[1].detail


def test_huge_record_is_rejected_without_killing_the_file(read_all, tmp_path):
    path = tmp_path / "huge.jsonl"
    big = json.dumps({"text": "x" * 5000})
    path.write_text('{"text": "a"}\n' + big + '\n{"text": "b"}\n')
    out = read_all(path, max_record_bytes=1000)
    assert [getattr(x, "text", None) for x in out] == ["a", None, "b"]
    assert out[1].reason == corpus.RECORD_TOO_LARGE and out[1].position == 2 and f"{len(big)} bytes" in out[1].detail


def test_zstd_jsonl_multi_frame(read_all, tmp_path):
    path = tmp_path / "part.jsonl.zst"
    c = zstandard.ZstdCompressor()
    path.write_bytes(c.compress(b'{"text": "frame one"}\n') + c.compress(b'{"text": "frame two"}\n'))
    assert [r.text for r in read_all(path)] == ["frame one", "frame two"]


def test_truncated_zstd_keeps_what_was_read_and_reports_the_rest(read_all, tmp_path):
    lines = b"".join(b'{"text": "line %d"}\n' % i for i in range(20000))
    blob = zstandard.ZstdCompressor().compress(lines)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(blob[: len(blob) // 2])
    out = read_all(path)
    good = [x for x in out if isinstance(x, Record)]
    bad = [x for x in out if isinstance(x, Rejected)]
    assert 0 < len(good) < 20000
    assert [r.text for r in good] == [f"line {i}" for i in range(len(good))]
    assert bad[-1].reason == corpus.TRUNCATED_STREAM and bad[-1].source == str(path)


def test_garbage_zstd_is_an_unreadable_file(read_all, tmp_path):
    path = tmp_path / "garbage.jsonl.zst"
    path.write_bytes(b"this is not zstd at all" * 10)
    out = read_all(path)
    assert len(out) == 1 and out[0].reason == corpus.UNREADABLE_FILE


def test_empty_file_is_reported(read_all, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    out = read_all(path)
    assert len(out) == 1 and out[0].reason == corpus.EMPTY_FILE


def test_parquet_text_column_nulls_and_missing_column(read_all, tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["alpha", None, "gamma"]}), path)
    out = read_all(path, text_field="content")
    assert [type(x) for x in out] == [Record, Rejected, Record]
    assert out[1].position == 1 and out[1].reason == corpus.MISSING_TEXT
    missing = read_all(path, text_field="text")
    assert len(missing) == 1 and missing[0].reason == corpus.MISSING_TEXT and "content" in missing[0].detail


def test_plain_text_file_is_one_record_and_bad_utf8_rejected(read_all, tmp_path):
    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("Some prose.\nMore prose.")
    bad.write_bytes(b"caf\xe9 au lait")
    assert read_all(good) == [Record(str(good), 0, "Some prose.\nMore prose.", "")]
    assert read_all(bad)[0].reason == corpus.INVALID_UTF8


@pytest.mark.parametrize("match", [corpus_io.match_inputs, corpus.match_local], ids=["beam", "local"])
def test_match_inputs_directories_globs_and_missing(tmp_path, match):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.jsonl", "d/sub/b.txt", "d/c.jsonl.zst"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "d" / ".hidden").write_bytes(b"x")
    found = [p for p, _ in match([str(tmp_path / "d")])]
    assert found == sorted(str(tmp_path / n) for n in ("d/a.jsonl", "d/sub/b.txt", "d/c.jsonl.zst"))
    assert [p for p, _ in match([str(tmp_path / "d" / "*.zst")])] == [str(tmp_path / "d/c.jsonl.zst")]
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        match([str(tmp_path / "nothing-here*")])


def test_iter_lines_handles_lines_across_blocks():
    blocks = [b"ab", b"c\nde", b"f\n\ng"]
    assert [(n, line) for n, line, _ in corpus.iter_lines(iter(blocks), 100)] == [
        (1, b"abc"),
        (2, b"def"),
        (3, b""),
        (4, b"g"),
    ]
