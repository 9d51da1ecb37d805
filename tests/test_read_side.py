"""The read side (retro_db) stands alone, the DB's names live in one module, every stage follows one
protocol, and every CLI ends a user error in one line."""

import ast
import dataclasses
import glob
import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline.stage import ConfigMismatch, Stage, completed
from retro_db import layout
from retro_db.manifest import DBNotReady, read_manifest, write_manifest

CODE = ("retro_db", "pipeline", "model", "index_service", "bench")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "blocked, modules",
    [
        (
            "apache_beam",
            "index_service.app, model.data, model.evaluate, model.generate, "
            "retro_db.corpus, retro_db.search, retro_db.token_store, "
            "retro_db.deletions",
        ),
        ("ray", "model.data, model.train, model.evaluate, model.generate, retro_db.search, retro_db.embedder"),
    ],
)
def test_service_and_model_import_without_beam_or_ray(blocked, modules):
    # sys.modules[name] = None makes any import of it (or of a submodule) raise ImportError
    done = _python(f"import sys; sys.modules[{blocked!r}] = None; import {modules}")
    assert done.returncode == 0, done.stderr[-2000:]


def _string_constants(path: str) -> set[str]:
    """String literals of a module, docstrings left out (they describe the layout, they do not spell paths)."""
    tree = ast.parse(open(path).read())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.add(node.value)
        elif isinstance(node, ast.JoinedStr):  # f-strings: their literal parts
            found |= {v.value for v in node.values if isinstance(v, ast.Constant)}
    return found


def test_each_db_file_name_is_spelled_in_one_module():
    names = [
        layout.MANIFEST,
        layout.MANIFEST_LOCK,
        layout.TOKENIZER,
        layout.TRAINED_INDEX,
        layout.TOKEN_META,
        *layout.TOKEN_ARRAYS,
        layout.DELETIONS_AUDIT,
        layout.DELETIONS_STATE,
        layout.DELETIONS_LOCK,
        layout.STAGING_CHUNKS,
        ".faissindex",
    ]
    files = [f for package in CODE for f in glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True)]
    assert len(files) > 30
    spelled = {
        name: sorted(os.path.relpath(f, REPO) for f in files if any(name in s for s in _string_constants(f)))
        for name in names
    }
    expected = {name: ["retro_db/layout.py"] for name in names}
    expected[layout.TOKENIZER] = [
        "bench/gpu_check.py",
        "retro_db/layout.py",
    ]  # gpu_check copies the BERT's own HF files
    assert spelled == expected


@dataclasses.dataclass
class ToyConfig:
    width: int = 4
    label: str = "a"


def _toy_stage_run(db: str, name: str, config: ToyConfig, out: str, *, overwrite: bool = False) -> dict:
    """A stage written the way every build stage is: check, skip or start, work, complete with hashes."""
    stage = Stage(db, name, config, fingerprints={"input_sha256": "f" * 8}, overwrite=overwrite)
    if done := stage.finished([out]):
        return done
    stage.start(wipe=[os.path.dirname(out)])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(config.label * config.width)
    return stage.complete(shards=[stage.shard(out, rows=1)])


def test_stage_protocol_skips_refuses_and_wipes(tmp_path):
    db = str(tmp_path / "db")
    out, later_out = os.path.join(db, "embeddings", "x.txt"), os.path.join(db, "index", "y.txt")
    with pytest.raises(DBNotReady, match="python -m pipeline chunks"):
        completed(db, "chunks")

    first = _toy_stage_run(db, "embeddings", ToyConfig(), out)
    assert first["status"] == "complete" and first["config"] == {"width": 4, "label": "a", "input_sha256": "ffffffff"}
    assert first["shards"] == [
        {"path": "embeddings/x.txt", "rows": 1, "sha256": hashlib.sha256(b"aaaa").hexdigest(), "status": "complete"}
    ]
    _toy_stage_run(db, "index", ToyConfig(), later_out)
    assert completed(db, "embeddings") == first

    assert (
        _toy_stage_run(db, "embeddings", ToyConfig(), out)["updated"] == first["updated"]
    )  # skipped: nothing rewritten
    os.remove(out)
    assert _toy_stage_run(db, "embeddings", ToyConfig(), out)["shards"] == first["shards"]  # a missing output is redone

    with pytest.raises(ConfigMismatch, match="differs in: label, width"):
        _toy_stage_run(db, "embeddings", ToyConfig(width=2, label="b"), out)
    assert open(out).read() == "aaaa"  # refused: untouched

    again = _toy_stage_run(db, "embeddings", ToyConfig(width=2, label="b"), out, overwrite=True)
    assert open(out).read() == "bb" and again["config"]["width"] == 2
    assert "index" not in read_manifest(db)["stages"]  # every later stage's record dropped with it


def test_an_old_manifest_format_is_refused_with_a_clear_message(tmp_path):
    db = str(tmp_path)
    write_manifest(db, {"format": 1, "stages": {}})
    manifest = json.load(open(layout.manifest_path(db)))
    manifest["format"] = 0
    json.dump(manifest, open(layout.manifest_path(db), "w"))
    with pytest.raises(ValueError, match="has format 0, this code reads 1; rebuild the DB"):
        read_manifest(db)


def test_every_config_field_is_a_flag():
    from index_service.__main__ import build_parser as service_parser
    from index_service.app import ServiceConfig
    from model.train import TrainConfig
    from model.train import build_parser as train_parser
    from pipeline.__main__ import FLAGS, SKIP
    from pipeline.__main__ import build_parser as pipeline_parser
    from pipeline.index_build import IndexConfig
    from retro_db.cli import config_from_args

    args, _ = pipeline_parser().parse_known_args(
        [
            "build-db",
            "--rerank-factor",
            "2",
            "--no-skip-textless-chunks",
            "--index-seed",
            "7",
            "--embed-batch-size",
            "16",
            "--num-shards",
            "3",
            "--k-eval",
            "5",
        ]
    )
    for cls, flags in FLAGS.items():
        fields = {f.name for f in dataclasses.fields(cls)} - set(SKIP.get(cls, ()))
        assert {name for name in fields if hasattr(args, f"{cls.__name__}.{name}")} == fields
    index = config_from_args(IndexConfig, args)
    assert (index.rerank_factor, index.skip_textless_chunks, index.seed) == (2, False, 7)
    assert (
        config_from_args(TrainConfig, train_parser().parse_args(["--out", "x", "--steps", "5", "--lr", "0.01"])).steps
        == 5
    )
    service = config_from_args(
        ServiceConfig, service_parser().parse_args(["--db", "d", "--shard-groups", "3", "--mmap-index"])
    )
    assert (service.db, service.shard_groups, service.mmap_index) == ("d", 3, True)
    assert set(ServiceConfig.model_fields) <= {
        k.split(".", 1)[1] for k in vars(service_parser().parse_args([])) if "." in k
    }


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["-m", "model.train", "--db", "no-such-db", "--out", "runs/x"],
            "no manifest.json, so no DB is there; build it first (make build-db DB=no-such-db)",
        ),
        (
            ["-m", "model.evaluate", "--db", "no-such-db", "--run", "no-such-run"],
            "train the run first (make train DB=no-such-db RUN=no-such-run)",
        ),
        (
            ["-m", "pipeline", "index", "--db", "no-such-db"],
            "no manifest.json, so no DB is there; build it first (`python -m pipeline embed --db no-such-db`",
        ),
        (["-m", "index_service", "--db", "no-such-db"], "no manifest.json, so no DB is there"),
        (
            ["-m", "model.generate", "--db", "no-such-db", "--ckpt", "no-such.pt", "--prompt", "x"],
            "no checkpoint at no-such.pt",
        ),
    ],
)
def test_cli_user_errors_end_in_one_line(tmp_path, argv, says):
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and says in errors[0], done.stderr[-2000:]


def test_token_texts_join_to_the_decoded_text_and_split_no_character(db):
    from retro_db.tokenizer import db_tokenizer, token_texts

    tokenizer = db_tokenizer(db)
    for text in [
        "plain ASCII, with spaces",
        "accents: héllo wörld — ✓",
        "CJK 日本語 and emoji 🎉🎉 mixed",
        "a<|endoftext|>b<|pad|>",
    ]:
        ids = tokenizer.encode(text).ids
        pieces = token_texts(tokenizer, ids)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False)  # HF's own decoder is the reference
        assert not any("\ufffd" in p for p in pieces)  # every piece is whole characters


def test_token_decoder_decodes_every_chunk_and_any_cut_as_the_tokenizer_does(db):
    import numpy as np

    from retro_db.token_store import TokenStore
    from retro_db.tokenizer import EOS, TokenDecoder, db_tokenizer, special_id

    tokenizer, store = db_tokenizer(db), TokenStore(db)
    decoder = TokenDecoder(tokenizer)
    tokens, lengths = store.chunks(np.arange(len(store)))
    lengths[::3] = lengths[::3] // 2  # rows cut short, some inside a character
    lengths[::7] = 0
    reference = tokenizer.decode_batch([row[:n].tolist() for row, n in zip(tokens, lengths)], skip_special_tokens=False)
    assert decoder.decode(tokens, lengths) == reference  # HF's own decoder is the reference
    # every prefix and suffix of text with multi-byte characters split over tokens, and special tokens between them
    ids = tokenizer.encode("héllo wörld 日本語 ✓ 🎉").ids
    ids = ids[:4] + [special_id(tokenizer, EOS)] + ids[4:]
    rows = [ids[:cut] for cut in range(len(ids) + 1)] + [ids[cut:] for cut in range(len(ids))]
    padded = np.array([row + [0] * (len(ids) - len(row)) for row in rows])
    got = decoder.decode(padded, np.array([len(row) for row in rows]))
    assert got == [tokenizer.decode(row, skip_special_tokens=False) for row in rows]
    assert any("\ufffd" in text for text in got)  # some cuts split a character, as meant
    assert decoder.decode(tokens[:0], lengths[:0]) == []


def test_document_catalog_finds_every_document_as_the_parquet_files_hold_it(db):
    import pyarrow.parquet as pq

    from retro_db.documents import DocumentCatalog

    rows = [r for f in glob.glob(os.path.join(db, "documents", "*", "*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) > 100
    found = DocumentCatalog(db).describe([r["doc_id"] for r in rows] + [10**9, -1])
    assert len(found) == len(rows)  # unknown ids are left out
    for r in rows:
        assert found[r["doc_id"]] == {
            "doc_id": r["doc_id"],
            "source": r["source"],
            "position": r["position"],
            "meta": json.loads(r["meta"] or "{}"),
        }


def test_an_index_shard_over_the_table_cap_searches_without_a_precomputed_table_and_finds_the_same(tmp_path):
    """Every shard carries its own IVF-PQ precomputed table, sized by nlist; past the cap a shard is searched with
    tables made per probed list. Here the cap is lowered below a small index's table: same results as with it."""
    import faiss
    import numpy as np

    from retro_db import search

    assert faiss.cvar.precomputed_table_max_bytes == search.PRECOMPUTED_TABLE_MAX_BYTES  # set on import
    rng = np.random.default_rng(0)
    data, queries = rng.standard_normal((20000, 32), dtype=np.float32), rng.standard_normal((200, 32), dtype=np.float32)
    index = faiss.index_factory(32, "IVF64,PQ8x8np")
    index.train(data)
    index.add_with_ids(data, np.arange(len(data), dtype=np.int64))
    path = str(tmp_path / "shard.faissindex")
    faiss.write_index(index, path)
    with_table = search.IndexShard(path)
    assert faiss.downcast_index(faiss.extract_index_ivf(with_table.index)).precomputed_table.size() == 64 * 8 * 256
    try:
        faiss.cvar.precomputed_table_max_bytes = 64 * 8 * 256 * 4 - 1
        without = search.IndexShard(path)
    finally:
        faiss.cvar.precomputed_table_max_bytes = search.PRECOMPUTED_TABLE_MAX_BYTES
    assert faiss.downcast_index(faiss.extract_index_ivf(without.index)).precomputed_table.size() == 0
    d1, i1 = with_table.search(queries, 10, nprobe=8)
    d2, i2 = without.search(queries, 10, nprobe=8)
    assert (i1 == i2).mean() > 0.99 and np.allclose(d1, d2, rtol=1e-3, atol=1e-3)
