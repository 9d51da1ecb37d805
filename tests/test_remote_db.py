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
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    corpus = "".join(json.dumps({"text": d["text"]}) + "\n" for d in default_corpus_docs(40))
    client.put_object(Bucket=BUCKET, Key="corpus/docs.jsonl", Body=corpus.encode())
    yield {"client": client, "env": env, "endpoint": f"http://127.0.0.1:{port}"}
    server.stop()


def _objects(client) -> dict:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="db/")
    return {o["Key"][len("db/"):]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _read(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_build_db_reads_and_writes_a_bucket(s3, tmp_path):
    cmd = [sys.executable, "-m", "pipeline", "build-db", "--corpus", f"s3://{BUCKET}/corpus/docs.jsonl", "--db", f"s3://{BUCKET}/db",
           "--work-dir", str(tmp_path / "mirror"), "--num-shards", "2", "--vocab-size", "1024", "--valid-fraction", "0.1",
           "--test-fraction", "0.1", "--embed-block-rows", "256", "--runner=FnApiRunner", f"--s3_endpoint_url={s3['endpoint']}"]
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
    read = subprocess.run([sys.executable, "-c", "import sys, json; sys.modules['apache_beam'] = None\n"
                           "from retro_db import layout, manifest, storage\n"
                           f"db = 's3://{BUCKET}/db'\n"
                           "print(json.dumps([manifest.read_manifest(db), storage.sha256_file(layout.tokenizer_path(db))]))"],
                          cwd=REPO, env={**s3["env"], "AWS_ENDPOINT_URL": s3["endpoint"]}, capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    assert json.loads(read.stdout) == [manifest, hashlib.sha256(_read(s3["client"], "db/tokenizer.json")).hexdigest()]

    again = subprocess.run(cmd, cwd=REPO, env=s3["env"], capture_output=True, text=True, timeout=900)  # resumes: nothing to redo
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(_read(s3["client"], "db/manifest.json"))["stages"]
    assert all(rerun[s]["updated"] == stages[s]["updated"] for s in stages)  # every stage skipped
    assert "embeddings: complete with the same config, skipping" in again.stderr
    assert _objects(s3["client"]) == objects
