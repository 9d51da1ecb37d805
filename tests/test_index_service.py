"""The index service on Ray Serve, against a copy of the test DB: answers, errors, deletes, growth, restarts."""

import glob
import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
import requests

from conftest import BEAM_TEST_ARGS, REPO, audit_lines, default_corpus_docs, free_port

SMALL_MACHINE = dict(search_cpus=0.1, embed_cpus=0.25, ingress_cpus=0.1)  # leaves CPUs for add-documents' Ray actors
ADMIN_TOKEN = "test-admin-token-0123456789"
READ_TOKEN = "test-read-token-0123456789"


def serve_yaml_args() -> dict:
    """The application args of deploy/serve.yaml: the tested service is the deployed one."""
    import yaml

    (app,) = yaml.safe_load(open(os.path.join(REPO, "deploy", "serve.yaml")))["applications"]
    return app["args"]


@pytest.fixture(scope="module")
def service_db(db, tmp_path_factory):
    """The session DB copied: this module deletes and adds documents."""
    path = str(tmp_path_factory.mktemp("service") / "db")
    shutil.copytree(db, path)
    return path


@pytest.fixture(scope="module")
def admin_token_file(tmp_path_factory):
    """The admin token as a mounted Kubernetes Secret holds it: a file, named token per line."""
    path = tmp_path_factory.mktemp("secret") / "admin-tokens"
    path.write_text(f"# name:token\nci-admin:{ADMIN_TOKEN}\n")
    return str(path)


@pytest.fixture(scope="module")
def service(service_db, admin_token_file, runs):
    from ray import serve

    from index_service.app import ServiceConfig, build_app
    from index_service.client import IndexClient
    from retro_db.ray_cluster import connect_ray

    connect_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        **serve_yaml_args(),
        **SMALL_MACHINE,
        "db": service_db,
        "admin_token_file": admin_token_file,
        "run": str(runs[0]),
    }
    assert args["shard_groups"] == 2  # index shards on two replicas, merged by the ingress
    serve.run(build_app(ServiceConfig(**args)), name="retro-index-test", route_prefix="/")
    client = IndexClient(f"http://127.0.0.1:{port}", token=ADMIN_TOKEN)
    deadline = time.time() + 120
    while True:
        try:
            client.health()
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)
    yield client
    serve.shutdown()


def _valid_queries(db, n=16):
    from retro_db.search import load_embedding_rows

    rows = load_embedding_rows(db, "valid")
    return np.asarray(rows.arrays[0][:n], dtype=np.float32)


RECORDING = os.path.join(REPO, "tests", "data", "service_recording.json")


def test_a_fixed_set_of_requests_answers_as_recorded(service, service_db, tmp_path_factory):
    """Search (texts, tokens, embeddings), chunks, generation (greedy, sampled), explanation, info, the
    schema, deletions and errors answer as ``tests/data/service_recording.json`` recorded them from the
    same deterministic fixtures (``RETRO_RECORD_SERVICE=1`` writes it anew): every id, token, text and
    status exactly, floats to 1e-4 relative, because the fixtures' BERT, training and faiss round
    differently on CPUs of other vector units (an AMD EPYC's recording differs on an Intel Xeon by
    5.4e-5 relative at most, all in floats). Runs first: the module's other tests change the DB."""
    from service_recording import differences, record

    recording = record(service.url, service_db, ADMIN_TOKEN, roots=(str(tmp_path_factory.getbasetemp()),))
    if os.environ.get("RETRO_RECORD_SERVICE") == "1":
        os.makedirs(os.path.dirname(RECORDING), exist_ok=True)
        with open(RECORDING, "w") as f:
            json.dump(recording, f, indent=1, ensure_ascii=False)
    expected = json.load(open(RECORDING))
    assert expected["delete"]["status"] == 200 and expected["generate_sampled"]["status"] == 200
    assert differences(expected, recording, float_tolerance=1e-4) == []


def test_the_recording_comparison_lets_only_floats_move_and_only_within_the_tolerance():
    from service_recording import differences

    body = {"results": [[{"chunk_id": 3, "text": "a", "distance": 7.5774}]], "n": 1}
    before = {"search": {"status": 200, "body": json.dumps(body)}}

    def after(**change):
        moved = {"results": [[{**body["results"][0][0], **change}]], "n": 1}
        return {"search": {"status": 200, "body": json.dumps(moved)}}

    assert differences(before, after(distance=7.5770)) == ["search"]  # byte for byte by default
    assert differences(before, after(distance=7.5770), float_tolerance=1e-4) == []
    assert differences(before, after(distance=7.58), float_tolerance=1e-4) == ["search"]
    assert differences(before, after(chunk_id=4), float_tolerance=1e-4) == ["search"]
    assert differences(before, after(text="b"), float_tolerance=1e-4) == ["search"]
    assert differences(before, after(distance=7), float_tolerance=1e-4) == ["search"]  # an int where a float was
    assert differences(before, {"search": {"status": 500, "body": before["search"]["body"]}}, 1e-4) == ["search"]
    assert differences(before, {}, 1e-4) == ["search"]


def test_search_equals_direct_search_of_the_built_index(service, service_db):
    from retro_db.search import RetrievalIndex

    index = RetrievalIndex(service_db)
    queries = _valid_queries(service_db)
    for nprobe in (None, 2):
        results = service.search(embeddings=queries, k=10, nprobe=nprobe)
        dists, ids = index.search(queries, 10, nprobe=nprobe)
        assert [[hit["chunk_id"] for hit in row] for row in results] == [list(row[row >= 0]) for row in ids]
        np.testing.assert_allclose([[hit["distance"] for hit in row] for row in results], dists, rtol=1e-6)


@pytest.fixture
def held_service(service, service_db, tmp_path):
    """The default layout beside the module's: one shard group, held by the ingress (no searcher hop);
    no admin token (changes disabled), and reads that need a read token ($RETRO_READ_TOKEN's form)."""
    from ray import serve

    from index_service.app import ServiceConfig, build_app
    from index_service.client import IndexClient

    read_tokens = tmp_path / "read-tokens"
    read_tokens.write_text(READ_TOKEN + "\n")
    config = ServiceConfig(**{**SMALL_MACHINE, "db": service_db, "read_token_file": str(read_tokens)})
    serve.run(build_app(config), name="retro-index-held", route_prefix="/held")
    yield IndexClient(service.url + "/held", token=READ_TOKEN)
    serve.delete("retro-index-held")


def test_concurrent_requests_are_batched_and_answered_as_in_process(service, held_service, service_db):
    """Concurrent requests of mixed sizes, k and nprobe share batches; each gets exactly its own answer."""
    from concurrent.futures import ThreadPoolExecutor

    from retro_db.search import RetrievalIndex

    index, queries = RetrievalIndex(service_db), _valid_queries(service_db, 32)
    shapes = [
        (i, n, k, nprobe)
        for i, (n, k, nprobe) in enumerate(
            [(1, 10, None), (4, 5, None), (16, 10, 2), (1, 3, 2), (8, 10, None), (2, 7, None)] * 2
        )
    ]
    texts = [
        f"{w} in Python"
        for w in ("sorting", "threads", "regular expressions", "decimal arithmetic", "file paths", "unit tests")
    ]
    assert held_service.health()["shard_groups"][0]["vectors"] == index.ntotal
    for client in (service, held_service):
        alone = [client.search(texts=[t], k=5) for t in texts]
        with ThreadPoolExecutor(8) as pool:
            vector_answers = list(
                pool.map(lambda s: client.search(embeddings=queries[s[0] : s[0] + s[1]], k=s[2], nprobe=s[3]), shapes)
            )
            text_answers = list(pool.map(lambda t: client.search(texts=[t], k=5), texts))
        for (i, n, k, nprobe), answer in zip(shapes, vector_answers):
            dists, ids = index.search(queries[i : i + n], k, nprobe=nprobe)
            assert [[hit["chunk_id"] for hit in row] for row in answer] == [list(row[row >= 0]) for row in ids]
            np.testing.assert_allclose([[hit["distance"] for hit in row] for row in answer], dists, rtol=1e-6)
        for one, batched in zip(alone, text_answers):  # BERT in a batch pads differently: ids, and distances to 1e-4
            assert [h["chunk_id"] for h in batched[0]][:3] == [h["chunk_id"] for h in one[0]][:3]
            np.testing.assert_allclose([h["distance"] for h in batched[0]], [h["distance"] for h in one[0]], rtol=1e-4)


def test_a_shard_group_runs_concurrent_batches_on_one_search_thread_with_its_openmp_count(db):
    """However many batches are in flight, a replica runs one faiss search at a time, on one thread with
    ``search_threads`` OpenMP threads (a thread per batch started a team per batch: 4 x 2 threads on 2
    cores), and answers each batch as the shards searched directly do."""
    import asyncio
    import threading

    import faiss

    from index_service.deployments import ShardGroup
    from retro_db.search import search_shards

    group, queries = ShardGroup(db, threads=3), _valid_queries(db, 16)
    seen, search_many = [], group.search_many

    def observed(requests):
        seen.append((threading.get_ident(), faiss.omp_get_max_threads()))
        return search_many(requests)

    group.search_many = observed
    batches = [[(queries[i : i + 4], 12, None)] for i in range(0, 16, 4)]

    async def in_flight():
        return await asyncio.gather(*(group.search(batch) for batch in batches))

    answers = asyncio.run(in_flight())
    assert len(seen) == 4 and len(set(seen)) == 1 and seen[0][1] == 3 and seen[0][0] != threading.get_ident()
    shards = list(group.shards.values())
    for batch, [(dists, ids)] in zip(batches, answers):
        want_d, want_i = search_shards(shards, batch[0][0], 12, nprobe=group.nprobe, selector=group.selector)
        np.testing.assert_array_equal(ids, want_i)
        np.testing.assert_array_equal(dists, want_d)


def test_results_carry_text_and_continuation(service, service_db):
    from retro_db.token_store import TokenStore
    from retro_db.tokenizer import PAD, load_lm_tokenizer, special_id

    store, tokenizer = TokenStore(service_db), load_lm_tokenizer(os.path.join(service_db, "tokenizer.json"))
    pad = special_id(tokenizer, PAD)
    hits = service.search(texts=["How do I sort a list in place?", "open a file for writing"], k=3, return_tokens=True)
    assert [len(row) for row in hits] == [3, 3]
    for hit in (h for row in hits for h in row):
        tokens, lengths = store.chunks([hit["chunk_id"]])
        assert hit["tokens"] == tokens[0, : lengths[0]].tolist()
        assert hit["text"] == tokenizer.decode(hit["tokens"], skip_special_tokens=False)
        assert hit["doc_id"] == int(store.doc_of([hit["chunk_id"]])[0])
        cont, cont_len = store.continuations([hit["chunk_id"]], pad)
        assert hit["continuation_tokens"] == cont[0, : cont_len[0]].tolist()
    assert "sort" in hits[0][0]["text"].lower()
    chunk = service.chunk(hits[0][0]["chunk_id"])
    assert (chunk["text"], chunk["continuation"]) == (hits[0][0]["text"], hits[0][0]["continuation"])


def test_text_and_token_queries_match_in_process_embedding(service, service_db):
    from retro_db.embedder import ChunkEmbedder
    from retro_db.search import RetrievalIndex
    from retro_db.token_store import TokenStore

    texts = ["The with statement and context managers", "decimal floating point arithmetic"]
    vectors = ChunkEmbedder(threads=1).embed_texts(texts)
    dists, ids = RetrievalIndex(service_db).search(vectors, 5)
    hits = service.search(texts=texts, k=5)
    assert [[h["chunk_id"] for h in row][:3] for row in hits] == [list(row[:3]) for row in ids]
    np.testing.assert_allclose([[h["distance"] for h in row] for row in hits], dists, rtol=1e-3)
    # a chunk's own LM tokens find the chunk itself first
    first_train = 3
    tokens, lengths = TokenStore(service_db).chunks([first_train])
    top = service.search(token_ids=[tokens[0, : lengths[0]].tolist()], k=1)[0][0]
    assert top["chunk_id"] == first_train and top["distance"] < 1e-3


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"texts": []}, 422, "at least 1"),
        ({"texts": ["x"] * 257}, 422, "at most 256"),
        ({"texts": ["x" * 20000]}, 422, "at most 16384 characters"),
        ({"texts": [""]}, 422, "at least 1 character"),
        ({"texts": ["x"], "token_ids": [[1]]}, 422, "exactly one"),
        ({"k": 3}, 422, "exactly one"),
        ({"texts": ["x"], "k": 0}, 422, "greater than or equal to 1"),
        ({"texts": ["x"], "k": 101}, 422, "less than or equal to 100"),
        ({"texts": ["x"], "nprobe": 0}, 422, "greater than or equal to 1"),
        ({"texts": ["x"], "nprobe": 60000}, 422, "less than or equal to"),
        ({"texts": ["x"], "k": 2.5}, 422, "valid integer"),
        ({"texts": ["x"], "k": "3"}, 422, "valid integer"),
        ({"embeddings": [[0.5, 0.5]]}, 422, "at least 384 items"),
        ({"token_ids": [[]]}, 422, "at least 1 item"),
        ({"token_ids": [[1, 10**6]]}, 422, "less than or equal to 2047"),
        ({"texts": ["x"], "colour": "blue"}, 422, "Extra inputs"),
    ],
)
def test_bad_searches_get_4xx_saying_what_is_wrong(service, body, status, message):
    response = requests.post(service.url + "/v1/search", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert message in response.text


def test_malformed_requests_and_unknown_ids(service):
    r = requests.post(
        service.url + "/v1/search", data="{texts: [", headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 422 and "JSON decode error" in r.text
    r = requests.post(
        service.url + "/v1/search",
        data='{"embeddings": [[NaN' + ", 0.0" * 383 + "]]}",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422 and "finite" in r.text
    r = requests.get(service.url + "/v1/chunks/123456789", timeout=30)
    assert r.status_code == 404 and "chunk 123456789 does not exist" in r.text
    assert requests.get(service.url + "/v1/chunks/-1", timeout=30).status_code == 422
    r = service.session.post(
        service.url + "/v1/documents/delete", json={"doc_ids": [10**9], "reason": "test"}, timeout=30
    )
    assert r.status_code == 404 and "unknown document ids: [1000000000]" in r.text
    r = service.session.post(
        service.url + "/v1/documents/delete", json={"doc_ids": [3.5], "reason": "test"}, timeout=30
    )
    assert r.status_code == 422 and "valid integer" in r.text
    r = service.session.post(service.url + "/v1/documents/delete", json={"doc_ids": [3]}, timeout=30)
    assert r.status_code == 422 and "reason" in r.text


def test_openapi_schema_and_metrics(service, service_db):
    import faiss

    nlist = faiss.extract_index_ivf(faiss.read_index(os.path.join(service_db, "index", "trained.faissindex"))).nlist
    schema = requests.get(service.url + "/openapi.json", timeout=30).json()
    assert {
        "/v1/search",
        "/v1/chunks/{chunk_id}",
        "/v1/documents/delete",
        "/v1/documents/restore",
        "/v1/deletions",
        "/healthz",
        "/metrics",
    } <= set(schema["paths"])
    # this DB's limits are in the schema, and the mutating endpoints declare the bearer token
    body = schema["paths"]["/v1/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert body["embeddings"]["items"]["minItems"] == body["embeddings"]["items"]["maxItems"] == 384
    assert body["token_ids"]["items"]["items"]["maximum"] == 2047 and body["nprobe"]["anyOf"][0]["maximum"] == nlist
    assert schema["paths"]["/v1/documents/delete"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/v1/search"]["post"]
    assert {"401", "403", "404", "422"} <= set(schema["paths"]["/v1/documents/delete"]["post"]["responses"])
    assert "404" in schema["paths"]["/v1/chunks/{chunk_id}"]["get"]["responses"]
    service.search(texts=["counted"], k=1)
    # each ingress replica counts what it answered, and a scrape reaches one of them: a few scrapes see both
    scrapes = [requests.get(service.url + "/metrics", timeout=30).text for _ in range(12)]
    ok = [
        line
        for metrics in scrapes
        for line in metrics.splitlines()
        if line.startswith('retro_index_requests_total{endpoint="/v1/search",status="200"}')
    ]
    assert ok and max(float(line.split()[-1]) for line in ok) >= 1
    assert any('retro_index_queries_total{kind="texts"}' in metrics for metrics in scrapes)


def test_deleted_documents_never_come_back(service, service_db):
    from retro_db.search import RetrievalIndex
    from retro_db.token_store import TokenStore

    queries = _valid_queries(service_db, 8)
    before = service.search(embeddings=queries, k=10)
    victims = sorted({before[0][0]["doc_id"], before[1][0]["doc_id"]})
    counts = service.delete_documents(victims, reason="test: never come back")
    victims = sorted(victims + counts["copies"])  # exact copies go with them
    victim_chunks, _ = TokenStore(service_db).chunks_of_documents(victims)
    assert (
        counts["documents"] == len(victims)
        and counts["chunks"] == len(victim_chunks)
        and counts["actor"] == "token:ci-admin"
    )
    after = service.search(embeddings=queries, k=10)
    assert all(len(row) == 10 for row in after)  # removed inside faiss: still k results
    assert not {h["doc_id"] for row in after for h in row} & set(victims)
    with pytest.raises(Exception, match="was deleted"):
        service.chunk(int(victim_chunks[0]))
    # persisted: a fresh process (a restarted replica, a training job) sees the deletion
    _, ids = RetrievalIndex(service_db).search(queries, 50)
    assert not np.isin(ids, victim_chunks).any()
    assert service.delete_documents(victims, reason="again")["documents"] == 0  # idempotent


def _replayed(db: str) -> set:
    """The deleted documents the audit log implies, replayed with plain sets."""
    deleted = set()
    for entry in audit_lines(db):
        changed = set(entry["doc_ids"]) | set(entry.get("copies", []))
        deleted = deleted | changed if entry["action"] == "delete" else deleted - changed
    return deleted


def _undeleted_docs(db: str, n: int, skip: int) -> list[int]:
    """``n`` train documents not deleted now, after the first ``skip`` of them (tests take disjoint ones)."""
    from retro_db.deletions import deleted_doc_ids
    from retro_db.token_store import TokenStore

    store = TokenStore(db)
    docs = np.unique(store.doc_of(np.arange(len(store.doc_ids.arrays[0]))))
    return [int(d) for d in np.setdiff1d(docs, deleted_doc_ids(db))[skip : skip + n]]


def test_token_sources_name_their_tokens_and_refuse_guessable_ones(tmp_path, monkeypatch):
    from index_service import auth

    monkeypatch.setenv(auth.ADMIN_ENV, "0123456789abcdefXYZ")
    secret = tmp_path / "tokens"
    secret.write_text("# rotated 2026-11\nalice:aaaaaaaaaaaaaaaa1\nbob : bbbbbbbbbbbbbbbb2\n\n")
    tokens = auth.Tokens.load(str(secret))
    assert (
        tokens.admin == {"0123456789abcdefXYZ": "admin", "aaaaaaaaaaaaaaaa1": "alice", "bbbbbbbbbbbbbbbb2": "bob"}
        and tokens.read == {}
    )
    assert (
        auth.match("bbbbbbbbbbbbbbbb2", tokens.admin) == "bob" and auth.match("bbbbbbbbbbbbbbbb3", tokens.admin) is None
    )
    assert auth.match(None, tokens.admin) is None
    secret.write_text("short\n")
    with pytest.raises(ValueError, match="line 1: a token needs at least 16"):
        auth.Tokens.load(str(secret))
    with pytest.raises(ValueError, match="No such file"):
        auth.Tokens.load(str(tmp_path / "missing"))


def test_mutations_need_the_admin_token_and_are_audited_and_reversible(service, held_service, service_db):
    from retro_db.deletions import deleted_doc_ids

    query = "regular expression syntax"
    hit = service.search(texts=[query], k=1)[0][0]
    body = {"doc_ids": [hit["doc_id"]], "reason": "auth test"}
    for path in ("/v1/documents/delete", "/v1/documents/restore"):
        anonymous = requests.post(service.url + path, json=body, timeout=30)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer", anonymous.text
        wrong = requests.post(
            service.url + path, json=body, headers={"Authorization": "Bearer " + "x" * len(ADMIN_TOKEN)}, timeout=30
        )
        assert wrong.status_code == 401
        # a service started without an admin token refuses every change, and says how to enable them
        disabled = requests.post(
            held_service.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )
        assert disabled.status_code == 403 and "RETRO_ADMIN_TOKEN" in disabled.text
    # reads are open on the module's service, and need the read token where one is configured
    search = {"texts": [query], "k": 1}
    assert requests.post(service.url + "/v1/search", json=search, timeout=30).status_code == 200
    assert requests.post(held_service.url + "/v1/search", json=search, timeout=30).status_code == 401
    assert (
        requests.get(
            held_service.url + "/v1/deletions", headers={"Authorization": "Bearer nope-nope-nope-nope"}, timeout=30
        ).status_code
        == 401
    )
    assert held_service.search(texts=[query], k=1)[0][0] == hit
    assert requests.get(held_service.url + "/healthz", timeout=30).status_code == 200  # probes need no token
    held_schema = requests.get(held_service.url + "/openapi.json", timeout=30).json()
    assert held_schema["paths"]["/v1/search"]["post"]["security"] == [{"HTTPBearer": []}]
    assert hit["doc_id"] not in deleted_doc_ids(service_db)

    seen = len(audit_lines(service_db))
    deleted = service.delete_documents([hit["doc_id"]], reason="licence withdrawn")
    assert service.search(texts=[query], k=1)[0][0]["doc_id"] != hit["doc_id"]
    restored = service.restore_documents([hit["doc_id"]], reason="licence renewed")
    assert service.search(texts=[query], k=1)[0][0] == hit  # back exactly as it was
    conflict = service.session.post(
        service.url + "/v1/documents/restore", json={"doc_ids": [hit["doc_id"]], "reason": "twice"}, timeout=30
    )
    assert conflict.status_code == 409 and "not deleted" in conflict.text

    on_disk = audit_lines(service_db)[seen:]
    assert [(e["action"], e["reason"], e["actor"], e["doc_ids"]) for e in on_disk] == [
        ("delete", "licence withdrawn", "token:ci-admin", [hit["doc_id"]]),
        ("restore", "licence renewed", "token:ci-admin", [hit["doc_id"]]),
    ]
    assert [e["seq"] for e in on_disk] == [deleted["seq"], restored["seq"]] == [seen + 1, seen + 2]
    assert service.deletions(since=seen)["entries"] == on_disk
    assert ADMIN_TOKEN not in open(os.path.join(service_db, "deleted", "audit.jsonl")).read()
    assert set(deleted_doc_ids(service_db).tolist()) == _replayed(service_db)


def delete_command(db: str, doc_id: int, reason: str) -> list[str]:
    """``python -m pipeline delete`` of one document, as an operator runs it."""
    return [sys.executable, "-m", "pipeline", "delete", "--db", db, "--doc-ids", str(doc_id), "--reason", reason]


def test_concurrent_deletes_from_the_service_and_the_cli_are_all_persisted_and_audited(service, service_db):
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from index_service.client import IndexClient
    from retro_db.deletions import deleted_doc_ids

    docs = _undeleted_docs(service_db, 9, skip=5)
    seen = len(audit_lines(service_db))
    clients = [IndexClient(service.url, token=ADMIN_TOKEN) for _ in range(2)]
    cli = subprocess.Popen(
        delete_command(service_db, docs[-1], "from the CLI"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda i: clients[i % 2].delete_documents([docs[i]], reason=f"concurrent {i}"), range(8))
        )
    assert cli.wait(timeout=300) == 0, cli.stderr.read()[-2000:]
    entries = audit_lines(service_db)[seen:]
    assert sorted(e["seq"] for e in entries) == list(range(seen + 1, seen + 10))  # no entry lost or numbered twice
    assert sorted(e["reason"] for e in entries) == sorted([f"concurrent {i}" for i in range(8)] + ["from the CLI"])
    assert {a["seq"] for a in answers} < {e["seq"] for e in entries}
    assert set(docs) <= set(deleted_doc_ids(service_db).tolist()) == _replayed(service_db)
    service.restore_documents(docs, reason="test over")


def test_a_deleter_killed_between_log_and_list_is_completed_by_the_next_writer(service, service_db):
    import subprocess

    from retro_db.deletions import deleted_doc_ids

    victim, other = _undeleted_docs(service_db, 2, skip=20)
    killed = subprocess.run(
        delete_command(service_db, victim, "killed"),
        cwd=REPO,
        env={**os.environ, "RETRO_FAILPOINT": "deletion-logged"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL after the log's line, before the deleted list
    assert audit_lines(service_db)[-1]["reason"] == "killed" and victim not in deleted_doc_ids(service_db)
    assert service.deletions(since=audit_lines(service_db)[-1]["seq"] - 1)["entries"][0]["reason"] == "killed"
    service.delete_documents([other], reason="after the crash")  # the next writer replays the log first
    assert {victim, other} <= set(deleted_doc_ids(service_db).tolist()) == _replayed(service_db)
    assert not {h["doc_id"] for h in service.search(texts=["any text at all"], k=50)[0]} & {victim, other}
    service.restore_documents([victim, other], reason="test over")
    assert set(deleted_doc_ids(service_db).tolist()) == _replayed(service_db)


def test_a_service_replica_killed_mid_delete_comes_back_with_the_log_and_the_list_agreeing(db, tmp_path):
    """SIGKILL of the replica doing a delete, between the audit log's line and the deleted list (its
    own Ray and Serve, started as `make serve` starts them, with the failpoint in every worker's
    environment): Serve restarts the replica, whose start completes the change."""
    import subprocess

    from retro_db.deletions import deleted_doc_ids

    work = str(tmp_path / "db")
    shutil.copytree(db, work)
    victim = _undeleted_docs(work, 1, skip=3)[0]
    port = free_port()
    env = {**os.environ, "RETRO_ADMIN_TOKEN": ADMIN_TOKEN, "RETRO_FAILPOINT": "deletion-logged", "RAY_ADDRESS": ""}
    served = subprocess.Popen(
        [sys.executable, "-m", "index_service", "--db", work, "--port", str(port), "--embed-cpus", "0.5"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not _answers(url + "/healthz"):
            assert served.poll() is None, served.stderr.read()[-3000:]
            time.sleep(1)
        try:
            r = requests.post(
                url + "/v1/documents/delete",
                json={"doc_ids": [victim], "reason": "killed mid-delete"},
                headers=headers,
                timeout=60,
            )
            assert r.status_code >= 500  # the replica died answering
        except requests.ConnectionError:
            pass
        assert audit_lines(work)[-1]["reason"] == "killed mid-delete"  # logged before the kill
        deadline = time.time() + 180  # Serve starts a new replica, which completes the change from the log
        while time.time() < deadline and victim not in deleted_doc_ids(work):
            time.sleep(1)
        assert set(deleted_doc_ids(work).tolist()) == _replayed(work) == {victim}
        while time.time() < deadline and not _answers(url + "/healthz"):
            time.sleep(1)
        listed = requests.get(url + "/v1/deletions", timeout=30).json()
        assert [e["reason"] for e in listed["entries"]] == ["killed mid-delete"] and listed[
            "total_documents_deleted"
        ] == 1
    finally:
        os.killpg(served.pid, 9)
        served.wait(timeout=60)


def test_the_haproxy_ingress_answers_as_in_process_and_stops_with_the_service(db, runs):
    """`python -m index_service --run ...` (its own Ray, as `make serve` starts it), beside a second
    local service: HAProxy, not a Python proxy, holds each port, searches and generation answer as in
    one process, and Ctrl-C leaves nothing listening."""
    import signal
    import subprocess

    import psutil

    from model.generate import generate
    from retro_db.search import RetrievalIndex
    from retro_db.tokenizer import EOS, db_tokenizer, special_id

    port, other_port = free_port(), free_port()

    def start(port: int, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "index_service",
                "--db",
                db,
                "--port",
                str(port),
                "--embed-cpus",
                "0.25",
                "--ingress-replicas",
                "1",
                *args,
            ],
            cwd=REPO,
            env={**os.environ, "RAY_ADDRESS": ""},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    served, other = (
        start(port, "--run", str(runs[0])),
        start(other_port),
    )  # two HAProxies on one machine: Ray's fixed ports clashed
    url = f"http://127.0.0.1:{port}"

    def listeners(port: int = port) -> set[str]:
        names = set()
        for c in psutil.net_connections("tcp"):
            if c.laddr.port == port and c.status == "LISTEN" and c.pid:
                try:
                    names.add(psutil.Process(c.pid).name())
                except (
                    psutil.NoSuchProcess
                ):  # gone since the listing: HAProxy reloads its config by replacing its process
                    pass
        return names

    def settled_listeners(port: int, deadline: float) -> set[str]:
        while (names := listeners(port)) != {"haproxy"} and time.time() < deadline:  # a reload may be under way
            time.sleep(1)
        return names

    try:
        deadline = time.time() + 240
        for process, answering in ((served, url), (other, f"http://127.0.0.1:{other_port}")):
            while time.time() < deadline and not _answers(answering + "/healthz"):
                assert process.poll() is None, process.stderr.read()[-3000:]
                time.sleep(1)
        assert (
            settled_listeners(port, time.time() + 60) == settled_listeners(other_port, time.time() + 60) == {"haproxy"}
        )
        other.send_signal(signal.SIGINT)  # its Ctrl-C frees the CPUs
        queries = _valid_queries(db)
        r = requests.post(url + "/v1/search", json={"embeddings": queries.tolist(), "k": 5}, timeout=60)
        assert r.status_code == 200, r.text
        dists, ids = RetrievalIndex(db).search(queries, 5)
        assert [[hit["chunk_id"] for hit in row] for row in r.json()["results"]] == ids.tolist()
        np.testing.assert_array_equal(
            np.array([[hit["distance"] for hit in row] for row in r.json()["results"]], dtype=np.float32), dists
        )
        tokenizer, (model, retriever) = db_tokenizer(db), _local_model(db, runs)
        prompt = tokenizer.encode(PROMPT * 2).ids
        tokens, _ = generate(model, prompt, retriever, max_new_tokens=70, stop_id=special_id(tokenizer, EOS))
        answer = requests.post(
            url + "/v1/generate", json={"prompt": PROMPT * 2, "max_new_tokens": 70}, timeout=300
        ).json()
        assert answer["text"] == tokenizer.decode(tokens[len(prompt) :])
        served.send_signal(signal.SIGINT)  # Ctrl-C: serve.shutdown()
        # the shutdown took over 120 s once in a full run on this 2-core machine (alone: seconds)
        served.wait(timeout=300)
        other.wait(timeout=300)
        assert not listeners() and not listeners(other_port)
    finally:
        for process in (served, other):
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait(timeout=60)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def test_token_queries_holding_special_tokens_embed_as_the_db_did(service, service_db):
    from retro_db.search import load_embedding_rows
    from retro_db.token_store import TokenStore
    from retro_db.tokenizer import EOS, load_lm_tokenizer, special_id

    store = TokenStore(service_db)
    eos = special_id(load_lm_tokenizer(os.path.join(service_db, "tokenizer.json")), EOS)
    n = len(store.tokens.arrays[0])  # the first train shard
    tokens, lengths = store.chunks(np.arange(n))
    with_eos = [i for i in range(n) if eos in tokens[i, : lengths[i]]][:4]
    assert len(with_eos) == 4  # documents end with <|endoftext|>: their last chunk holds it
    stored = load_embedding_rows(service_db).get(with_eos).astype(np.float32)
    hits = service.search(token_ids=[tokens[i, : lengths[i]].tolist() for i in with_eos], k=1)
    for i, row, vector in zip(with_eos, hits, stored):
        # the service embeds the chunk's own tokens into the DB's own vector for it: distance 0 up to fp16
        assert row[0]["chunk_id"] == i and row[0]["distance"] < 1e-3, (i, row[0]["distance"])


def test_bodies_over_the_limit_get_413_before_they_are_parsed(service):
    big = b'{"texts": ["' + b"a" * (33 << 20) + b'"]}'  # over the default 32 MiB
    r = requests.post(service.url + "/v1/search", data=big, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    chunked = requests.post(
        service.url + "/v1/search",
        data=(big[i : i + (1 << 20)] for i in range(0, len(big), 1 << 20)),
        headers={"content-type": "application/json"},
        timeout=120,
    )  # no Content-Length: counted as it streams
    assert chunked.status_code == 413 and "max_body_bytes" in chunked.json()["detail"]


def test_added_documents_are_served_without_restart(service, service_db, tmp_path):
    from pipeline.add_documents import add_documents
    from retro_db import manifest as mf

    vectors_before = service.health()["vectors"]
    kept = service.search(texts=["decimal floating point"], k=1)[0][0]["chunk_id"]
    chunk_before = service.chunk(kept)
    n_chunks_before = mf.read_manifest(service_db)["stages"]["chunks"]["counts"]["chunks"]
    new = [
        "The zorblax transfer protocol moves quibbles between two frobnicators. Each quibble carries a "
        "sixteen-byte glimmer header, and a frobnicator acknowledges every third quibble with a snark.",
        "Configuring zorblax: set ZORBLAX_HOME to the directory holding glimmer keys, then run "
        "zorblax-init --snark-interval 3 to create the frobnicator state files.",
    ]
    duplicate = default_corpus_docs(1)[0]["text"]  # already in the DB: dropped as an exact duplicate
    corpus = tmp_path / "new.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in new + [duplicate]))
    import threading

    statuses, stop = [], threading.Event()
    queries = _valid_queries(service_db, 4)

    def load():  # a bounded closed loop of searches while the increment lands
        while not stop.is_set():
            r = requests.post(service.url + "/v1/search", json={"embeddings": queries.tolist(), "k": 20}, timeout=60)
            statuses.append(r.status_code)
            statuses.append(
                requests.post(
                    service.url + "/v1/search", json={"texts": ["zorblax quibbles"], "k": 5}, timeout=60
                ).status_code
            )

    loop = threading.Thread(target=load)
    loop.start()
    try:
        entry = add_documents([str(corpus)], service_db, name="zorblax", beam_args=BEAM_TEST_ARGS)
        time.sleep(3)  # requests keep coming while the replicas pick the increment up
    finally:
        stop.set()
        loop.join()
    assert len(statuses) >= 20 and set(statuses) == {200}, sorted(set(statuses))
    assert entry["documents"] == 2 and entry["rejected"] == {"rejected_exact_duplicate": 1}
    assert entry["first_chunk_id"] >= n_chunks_before

    hits = service.search(texts=["zorblax protocol quibbles and frobnicators"], k=2)[0]
    assert hits[0]["chunk_id"] >= entry["first_chunk_id"] and "zorblax" in hits[0]["text"]
    assert service.health()["vectors"] == vectors_before + entry["vectors"]
    assert service.chunk(kept) == chunk_before  # existing ids unchanged
    assert add_documents([str(corpus)], service_db, name="zorblax") == entry  # rerun: nothing to do


@pytest.mark.parametrize("align", [False, True])
def test_generation_through_the_service_client_equals_local_retrieval(service, service_db, align):
    import torch

    from index_service.client import ServiceRetriever
    from model.generate import generate
    from model.model import Retro, tiny_config
    from model.retrieval import LocalRetriever
    from retro_db.tokenizer import PAD, load_lm_tokenizer, special_id

    tokenizer = load_lm_tokenizer(os.path.join(service_db, "tokenizer.json"))
    pad = special_id(tokenizer, PAD)
    torch.manual_seed(0)
    model = Retro(tiny_config(vocab_size=tokenizer.get_vocab_size(), pad_id=pad))
    prompt = tokenizer.encode("Python's for statement iterates over the items of any sequence, in order. " * 3).ids
    local = generate(model, prompt, LocalRetriever(service_db, k=2, align=align), max_new_tokens=140)
    remote = generate(
        model, prompt, ServiceRetriever.for_db(service.url, service_db, k=2, align=align), max_new_tokens=140
    )
    assert local[0] == remote[0]
    retrieved = [(h.ids.tolist(), h.rows.tolist(), h.distances.tolist()) for h in local[1] if h is not None]
    assert len(retrieved) >= 2
    assert retrieved == [(h.ids.tolist(), h.rows.tolist(), h.distances.tolist()) for h in remote[1] if h is not None]


PROMPT = (
    "Python's for statement iterates over the items of any sequence, a list or a string, "
    "in the order that they appear. "
)


def _local_model(db, runs):
    from model import checkpoint
    from model.retrieval import LocalRetriever

    model, ckpt = checkpoint.load(str(runs[0] / "retro" / "ckpt.pt"))
    assert model.config.align_neighbours  # the default: the service must line neighbours up as the model was trained
    return model.eval(), LocalRetriever(db, k=checkpoint.trained_k(ckpt), align=True)


@pytest.mark.parametrize("repeats, sampling", [(3, {}), (12, {"temperature": 0.9, "top_k": 40, "seed": 5})])
def test_generation_through_the_service_equals_generation_in_one_process(service, service_db, runs, repeats, sampling):
    """`make serve RUN=...`: the served model retrieving through the index deployments gives the tokens
    and the per-chunk neighbours that `model.generate` gives in one process with a local index (a
    prompt of 2 chunks, and one longer than the model's context: only its last chunks retrieve)."""
    from model.generate import generate
    from retro_db.tokenizer import EOS, db_tokenizer, special_id

    tokenizer = db_tokenizer(service_db)
    model, retriever = _local_model(service_db, runs)
    prompt = tokenizer.encode(PROMPT * repeats).ids
    tokens, per_chunk = generate(
        model, prompt, retriever, max_new_tokens=90, stop_id=special_id(tokenizer, EOS), **sampling
    )
    body = {"prompt": PROMPT * repeats, "max_new_tokens": 90, **sampling}
    answer = requests.post(service.url + "/v1/generate", json=body, timeout=300).json()
    assert answer["text"] == tokenizer.decode(tokens[len(prompt) :]) and answer["prompt_tokens"] == len(prompt)
    assert len(answer["chunks"]) == len(per_chunk) >= 2
    assert "".join(c["text"] for c in answer["chunks"]) == tokenizer.decode(tokens, skip_special_tokens=False)
    for chunk, hit in zip(answer["chunks"], per_chunk):
        assert [n["chunk_id"] for n in chunk["neighbours"]] == (
            [] if hit is None else [int(i) for i in hit.ids if i >= 0]
        )
    if len(prompt) > model.config.max_chunks * 64:  # the prompt's first chunk is in no generated token's context
        assert per_chunk[1] is None and per_chunk[-1] is not None
    same = requests.post(service.url + "/v1/generate", json=body, timeout=300).json()
    assert same == answer  # the same seed, the same text
    alone = requests.post(service.url + "/v1/generate", json={**body, "retrieval": False}, timeout=300).json()
    assert all(not c["neighbours"] for c in alone["chunks"])
    assert alone["text"] == tokenizer.decode(
        generate(model, prompt, None, max_new_tokens=90, stop_id=special_id(tokenizer, EOS), **sampling)[0][
            len(prompt) :
        ]
    )


def test_explain_scores_every_token_as_in_one_process_and_names_each_neighbours_source(service, service_db, runs):
    import pyarrow.parquet as pq

    from model.explain import token_logprobs
    from retro_db.tokenizer import db_tokenizer

    tokenizer = db_tokenizer(service_db)
    model, retriever = _local_model(service_db, runs)
    text = default_corpus_docs(200)[180]["text"][:900]
    tokens = tokenizer.encode(text).ids
    m = 64
    local = {u: retriever(tokens[u * m : (u + 1) * m]) for u in range((len(tokens) - 1) // m)}
    on, off = token_logprobs(model, tokens, {u: h.rows for u, h in local.items()})
    answer = requests.post(service.url + "/v1/explain", json={"text": text}, timeout=300).json()
    scored = answer["tokens"]
    assert len(scored) == len(tokens) and "".join(t["text"] for t in scored) == tokenizer.decode(
        tokens, skip_special_tokens=False
    )
    assert scored[0]["logprob"] is None and scored[0]["logprob_no_retrieval"] is None
    np.testing.assert_allclose([t["logprob"] for t in scored[1:]], on[1:], atol=1e-4)
    np.testing.assert_allclose([t["logprob_no_retrieval"] for t in scored[1:]], off[1:], atol=1e-4)
    assert any(abs(a - b) > 1e-6 for a, b in zip(on[m:], off[m:]))  # retrieval did something
    documents = {
        r["doc_id"]: r
        for f in glob.glob(os.path.join(service_db, "documents", "*", "*.parquet"))
        for r in pq.read_table(f).to_pylist()
    }
    assert answer["chunks"][0]["neighbours"] == []
    for u, chunk in enumerate(answer["chunks"][1:], start=1):
        ids, rows = local[u - 1].ids, local[u - 1].rows
        assert [n["chunk_id"] for n in chunk["neighbours"]] == [int(i) for i in ids if i >= 0]
        for n, window in zip(chunk["neighbours"], rows):
            row = documents[n["doc_id"]]
            assert (n["source"]["source"], n["source"]["position"], n["source"]["meta"]) == (
                row["source"],
                row["position"],
                json.loads(row["meta"] or "{}"),
            )
            # the text shown is the window the model read: the stored chunk, or where alignment moved it
            stored = service.chunk(n["chunk_id"])
            read = [
                tokenizer.decode([int(t) for t in part if t != model.config.pad_id], skip_special_tokens=False)
                for part in (window[:m], window[m:])
            ]
            assert [n["text"], n["continuation"]] == read
            if n["shift"] == 0:
                assert [n["text"], n["continuation"]] == [stored["text"], stored["continuation"]]


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/generate", {}, "Field required"),
        ("/v1/generate", {"prompt": ""}, "at least 1 character"),
        ("/v1/generate", {"prompt": "x", "max_new_tokens": 257}, "less than or equal to 256"),
        ("/v1/generate", {"prompt": "x", "max_new_tokens": 0}, "greater than or equal to 1"),
        ("/v1/generate", {"prompt": "word " * 1000}, "at most 4096 characters"),
        ("/v1/generate", {"prompt": "x", "temperature": -1}, "greater than or equal to 0"),
        ("/v1/generate", {"prompt": "x", "seed": "3"}, "valid integer"),
        ("/v1/generate", {"prompt": "x", "stream": True}, "Extra inputs"),
        ("/v1/explain", {"text": ""}, "at least 1 character"),
        ("/v1/explain", {"text": "x" * 4097}, "at most 4096 characters"),
        ("/v1/explain", {"text": "x", "k": 0}, "greater than or equal to 1"),
        ("/v1/explain", {"text": "x", "colour": "blue"}, "Extra inputs"),
    ],
)
def test_bad_generation_and_explanation_requests_get_422_saying_what_is_wrong(service, path, body, message):
    response = requests.post(service.url + path, json=body, timeout=60)
    assert response.status_code == 422, response.text
    assert message in response.text


def test_without_a_model_the_service_is_the_index_service(held_service):
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    r = requests.post(held_service.url + "/v1/generate", json={"prompt": "x"}, headers=headers, timeout=60)
    assert r.status_code == 404 and "serves no model" in r.text and "RUN=" in r.text
    assert (
        requests.post(held_service.url + "/v1/generate", json={"prompt": "x"}, timeout=60).status_code == 401
    )  # reads need the token here
    schema = requests.get(held_service.url + "/openapi.json", timeout=30).json()
    assert (
        "/v1/generate" not in schema["paths"]
        and "/v1/explain" not in schema["paths"]
        and "/v1/search" in schema["paths"]
    )
    info = requests.get(held_service.url + "/v1/info", headers=headers, timeout=30).json()
    assert info["model"] is None and info["admin"] is False


def test_schemathesis_with_every_check_finds_nothing_and_deletes_nothing_without_the_token(
    service, service_db, tmp_path
):
    """``st run --checks all`` as a new user runs it: schema-valid requests accepted, invalid ones
    refused, every status and response documented, no 5xx; the mutating endpoints refuse it."""
    import subprocess

    seen = len(audit_lines(service_db))
    st = os.path.join(os.path.dirname(sys.executable), "st")
    done = subprocess.run(
        [
            st,
            "run",
            service.url + "/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "60",
            "--seed",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--no-color",
            # a 256-token generation on 2 busy cores can pass st's default 10 s: slowness is not a finding
            "--request-timeout",
            "60",
            "--max-response-time",
            "60",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:]
    assert " passed" in done.stdout and "generated" in done.stdout
    assert len(audit_lines(service_db)) == seen  # unauthenticated: nothing deleted


def test_a_killed_shard_replica_is_restarted_by_serve(service):
    import ray

    queries = np.random.default_rng(0).standard_normal((4, 384)).astype(np.float32)
    before = service.search(embeddings=queries, k=5)
    victim = service.health()["shard_groups"][0]["replica"]  # the replica's actor name
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline, answer, replica = time.time() + 120, None, victim
    while time.time() < deadline and (answer is None or replica == victim):
        try:
            answer = service.search(embeddings=queries, k=5)
            replica = service.health()["shard_groups"][0]["replica"]
        except Exception:  # 503 while Serve notices the death and starts a new replica
            answer = None
            time.sleep(1)
    assert replica != victim
    assert answer == before


def test_serve_config_yaml_builds_the_make_serve_application(service_db):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(open(os.path.join(REPO, "deploy", "serve.yaml"))))
    (application,) = config.applications
    module, name = application.import_path.split(":")
    assert (module, name) == ("index_service.app", "build_app")
    from pydantic import ValidationError
    from ray.serve._private.api import (
        call_user_app_builder_with_args_if_necessary as serve_builds,
    )  # what serve run/deploy call

    from index_service import app
    from retro_db.manifest import DBNotReady

    built = serve_builds(getattr(app, name), {**application.args, "db": service_db})
    assert type(built).__name__ == "Application"
    with pytest.raises(DBNotReady, match="no manifest.json"):
        serve_builds(app.build_app, {**application.args, "db": os.path.join(service_db, "missing")})
    with pytest.raises(ValidationError, match="shard_gropus"):  # a typo is refused before anything starts
        serve_builds(app.build_app, {**application.args, "db": service_db, "shard_gropus": 3})
    with pytest.raises(ValidationError, match="shard_groups"):
        serve_builds(app.build_app, {**application.args, "db": service_db, "shard_groups": "two"})
