"""build-db against an S3-compatible server (moto, started by the test): corpus read from and DB
written to a bucket, every stage's files in the bucket with the manifest's hashes, reruns resume."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, default_corpus_docs, free_port

BUCKET = "retro-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    corpus = "".join(json.dumps({"text": d["text"]}) + "\n" for d in default_corpus_docs(40))
    client.put_object(Bucket=BUCKET, Key="corpus/docs.jsonl", Body=corpus.encode())
    yield {"client": client, "env": env, "endpoint": f"http://127.0.0.1:{port}"}
    server.stop()


def _objects(client) -> dict:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="db/")
    return {o["Key"][len("db/") :]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _read(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_build_db_reads_and_writes_a_bucket(s3, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "build-db",
        "--corpus",
        f"s3://{BUCKET}/corpus/docs.jsonl",
        "--db",
        f"s3://{BUCKET}/db",
        "--work-dir",
        str(tmp_path / "mirror"),
        "--num-shards",
        "2",
        "--vocab-size",
        "1024",
        "--valid-fraction",
        "0.1",
        "--test-fraction",
        "0.1",
        "--embed-block-rows",
        "256",
        "--runner=FnApiRunner",
        f"--s3_endpoint_url={s3['endpoint']}",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=s3["env"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    objects = _objects(s3["client"])
    manifest = json.loads(_read(s3["client"], "db/manifest.json"))
    stages = manifest["stages"]
    assert all(stages[s]["status"] == "complete" for s in ("chunks", "embeddings", "index", "neighbours"))
    assert stages["chunks"]["config"]["inputs"][0][0] == f"s3://{BUCKET}/corpus/docs.jsonl"
    listed = [f[k] for f in stages["chunks"]["shards"] for k in ("chunks_file", "documents_file")]
    listed += [s for stage in ("embeddings", "index", "neighbours") for s in stages[stage]["shards"]]
    assert len(listed) >= 10
    for entry in listed:  # every file the manifest names is in the bucket, byte for byte
        assert hashlib.sha256(_read(s3["client"], "db/" + entry["path"])).hexdigest() == entry["sha256"], entry["path"]
    assert "tokenizer.json" in objects and "index/trained.faissindex" in objects
    assert any(k.startswith("tokens/train/") for k in objects)
    assert not [k for k in objects if ".tmp" in k or ".blocks" in k or "/." in k or k.startswith(".")]

    # a reader without Beam (retro_db.storage on pyarrow.fs) sees the same manifest and tokenizer in the bucket
    read = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, json; sys.modules['apache_beam'] = None\n"
            "from retro_db import layout, manifest, storage\n"
            f"db = 's3://{BUCKET}/db'\n"
            "print(json.dumps([manifest.read_manifest(db), storage.sha256_file(layout.tokenizer_path(db))]))",
        ],
        cwd=REPO,
        env={**s3["env"], "AWS_ENDPOINT_URL": s3["endpoint"]},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert read.returncode == 0, read.stderr[-3000:]
    assert json.loads(read.stdout) == [manifest, hashlib.sha256(_read(s3["client"], "db/tokenizer.json")).hexdigest()]

    again = subprocess.run(
        cmd, cwd=REPO, env=s3["env"], capture_output=True, text=True, timeout=900
    )  # resumes: nothing to redo
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(_read(s3["client"], "db/manifest.json"))["stages"]
    assert all(rerun[s]["updated"] == stages[s]["updated"] for s in stages)  # every stage skipped
    assert "embeddings: complete with the same config, skipping" in again.stderr
    assert _objects(s3["client"]) == objects


def test_mirror_syncs_by_the_manifests_sha256_and_removes_stale_files(s3, tmp_path, monkeypatch):
    from pipeline.remote_db import download_db, upload_db
    from retro_db.manifest import write_manifest

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, s3["env"][name])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    db, shard, small = f"s3://{BUCKET}/sync", "neighbours/train/shard-00000-of-00001.parquet", "deleted/state.npz"

    def write_local(root, shard_byte: bytes, small_byte: bytes, chunks_stage: int, extra: str | None = None):
        for relative, data in ((shard, shard_byte * (2 << 20)), (small, small_byte * 100)) + (
            ((extra, b"x"),) if extra else ()
        ):
            os.makedirs(os.path.dirname(os.path.join(root, relative)) or root, exist_ok=True)
            open(os.path.join(root, relative), "wb").write(data)
        sha = hashlib.sha256(shard_byte * (2 << 20)).hexdigest()
        write_manifest(
            str(root),
            {
                "format": 1,
                "stages": {"chunks": {"run": chunks_stage}, "neighbours": {"shards": [{"path": shard, "sha256": sha}]}},
            },
        )

    local = tmp_path / "local"
    write_local(local, b"a", b"1", 1, extra="stale.txt")
    upload_db(str(local), db)
    assert set(_objects_under(s3["client"], "sync/")) == {"manifest.json", shard, small, "stale.txt"}
    # the same sizes with other bytes (a refreshed table, a rewritten deleted list), and a file gone
    write_local(local, b"b", b"2", 1)
    os.remove(local / "stale.txt")
    upload_db(str(local), db)
    assert (
        _read(s3["client"], "sync/" + shard) == b"b" * (2 << 20) and _read(s3["client"], "sync/" + small) == b"2" * 100
    )
    assert "stale.txt" not in _objects_under(s3["client"], "sync/")

    # a mirror of an older build: same sizes, other bytes, a file the bucket does not have
    mirror = tmp_path / "mirror"
    write_local(mirror, b"c", b"3", 0, extra="index/old.faissindex")
    download_db(db, str(mirror))
    assert open(mirror / shard, "rb").read() == b"b" * (2 << 20) and open(mirror / small, "rb").read() == b"2" * 100
    assert not os.path.exists(mirror / "index" / "old.faissindex")


def _objects_under(client, prefix: str) -> dict:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix) :]: o["Size"] for page in pages for o in page.get("Contents", [])}
