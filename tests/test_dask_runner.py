"""The chunk stage on Beam's Dask runner: a scheduler and two single-threaded worker processes on
127.0.0.1, the same command a user runs, and the same bytes as the local runner."""

import glob
import hashlib
import json
import os
import subprocess
import sys

import pytest

from bench.dask_cluster import loopback_dask_cluster
from conftest import REPO, default_corpus_docs, write_mixed_corpus
from retro_db.manifest import read_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Bad records and exact duplicates (the mixed corpus), plus near-duplicates of 20 documents: some
    land in the same split as their original (near_duplicate), some across splits (leakage)."""
    root = tmp_path_factory.mktemp("dask")
    docs = default_corpus_docs(160)
    write_mixed_corpus(root / "in", docs)
    edited = []
    for doc in docs[:20]:
        words = doc["text"].split(" ")
        words[len(words) // 2] = "zzzz"
        edited.append(json.dumps({"text": " ".join(words)}))
    (root / "in" / "part-4.jsonl").write_text("\n".join(edited) + "\n")
    return root


@pytest.fixture(scope="module")
def dask_address(corpus):
    with loopback_dask_cluster(2, log_dir=str(corpus / "dask-logs")) as address:
        yield address


def _chunks(corpus, db, *runner_args):
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "chunks",
        "--corpus",
        str(corpus / "in"),
        "--db",
        str(db),
        "--num-shards",
        "2",
        "--valid-fraction",
        "0.1",
        "--test-fraction",
        "0.1",
        "--max-record-bytes",
        "200000",
        "--vocab-size",
        "2048",
        *runner_args,
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return read_manifest(str(db))["stages"]["chunks"]


def _files(db) -> dict[str, str]:
    paths = [p for p in glob.glob(os.path.join(db, "**", "*"), recursive=True) if os.path.isfile(p)]
    return {
        os.path.relpath(p, db): hashlib.sha256(open(p, "rb").read()).hexdigest()
        for p in paths
        if os.path.basename(p) not in ("manifest.json", ".manifest.lock")
    }


def test_chunk_stage_on_dask_gives_the_local_runners_bytes(corpus, dask_address):
    from distributed import Client

    local = _chunks(corpus, corpus / "local", "--runner=FnApiRunner")
    on_dask = _chunks(corpus, corpus / "dask", "--runner=DaskRunner", f"--dask_client_address={dask_address}")
    with Client(dask_address) as client:
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)

    assert len(executed) == 2 and all(n > 0 for n in executed.values())  # both worker processes ran tasks
    rejected = {k for k, v in local["counts"].items() if k.startswith("rejected_") and v}
    assert {
        "rejected_near_duplicate",
        "rejected_leakage",
        "rejected_malformed_json",
        "rejected_truncated_stream",
        "rejected_invalid_utf8",
    } <= rejected
    assert local["counts"]["by_split"]["retrieval"]["documents"] > 0  # the train duplicates, kept for retrieval only
    assert on_dask["counts"] == local["counts"] and on_dask["counts"]["balanced"]
    assert on_dask["shards"] == local["shards"]  # per-shard rows, bytes and sha256
    files = _files(corpus / "local")
    assert any(f.startswith("rejected/") for f in files) and any(f.startswith("documents/") for f in files)
    assert _files(corpus / "dask") == files  # chunks, documents, dead letters and tokenizer, byte for byte


def test_growing_a_db_on_dask_drops_its_existing_documents_as_the_local_runner_does(corpus, dask_address):
    """add-documents' chunk stage: new documents after the DB's ids, texts already in the DB dropped
    (the DB's document hashes are read by the pipeline itself)."""
    from pipeline.chunk_pipeline import ChunkConfig, write_chunk_shards

    db = corpus / "local"  # built by the test above
    docs = default_corpus_docs(200)
    (corpus / "new.jsonl").write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in docs[:3] + docs[180:200]))
    counts = read_manifest(str(db))["stages"]["chunks"]["counts"]
    config = ChunkConfig(
        valid_fraction=0.0,
        test_fraction=0.0,
        num_shards=2,
        first_doc_id=counts["documents_kept"],
        first_chunk_id=counts["chunks"],
    )
    grown = {}
    for name, args in (
        ("local", ["--runner=FnApiRunner"]),
        ("dask", ["--runner=DaskRunner", f"--dask_client_address={dask_address}"]),
    ):
        grown[name] = write_chunk_shards(
            [str(corpus / "new.jsonl")],
            str(corpus / f"increment-{name}"),
            config=config,
            tokenizer_path=str(db / "tokenizer.json"),
            existing_documents=str(db),
            beam_args=args,
        )
    assert (
        grown["local"]["counts"]["rejected_exact_duplicate"] == 3 and grown["local"]["counts"]["documents_kept"] == 20
    )
    assert grown["dask"]["counts"] == grown["local"]["counts"] and grown["dask"]["shards"] == grown["local"]["shards"]
    assert _files(corpus / "increment-dask") == _files(corpus / "increment-local")
