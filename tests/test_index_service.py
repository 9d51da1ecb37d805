"""The index service on Ray Serve, against a copy of the test DB: answers, errors, deletes, growth, restarts."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import requests

from conftest import BEAM_TEST_ARGS, REPO, default_corpus_docs, free_port

SMALL_MACHINE = dict(search_cpus=0.1, embed_cpus=0.25, ingress_cpus=0.1)  # leaves CPUs for add-documents' Ray actors


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
def service(service_db):
    from ray import serve

    from index_service.app import ServiceConfig, build_app
    from index_service.client import IndexClient
    from retro_db.ray_cluster import connect_ray

    connect_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {**serve_yaml_args(), **SMALL_MACHINE, "db": service_db}
    assert args["shard_groups"] == 2  # index shards on two replicas, merged by the ingress
    serve.run(build_app(ServiceConfig(**args)), name="retro-index-test", route_prefix="/")
    client = IndexClient(f"http://127.0.0.1:{port}")
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
def held_service(service, service_db):
    """The default layout beside the module's: one shard group, held by the ingress (no searcher hop)."""
    from ray import serve

    from index_service.app import ServiceConfig, build_app
    from index_service.client import IndexClient

    serve.run(build_app(ServiceConfig(**{**SMALL_MACHINE, "db": service_db})), name="retro-index-held", route_prefix="/held")
    yield IndexClient(service.url + "/held")
    serve.delete("retro-index-held")


def test_concurrent_requests_are_batched_and_answered_as_in_process(service, held_service, service_db):
    """Concurrent requests of mixed sizes, k and nprobe share batches; each gets exactly its own answer."""
    from concurrent.futures import ThreadPoolExecutor

    from retro_db.search import RetrievalIndex

    index, queries = RetrievalIndex(service_db), _valid_queries(service_db, 32)
    shapes = [(i, n, k, nprobe) for i, (n, k, nprobe) in enumerate([(1, 10, None), (4, 5, None), (16, 10, 2), (1, 3, 2), (8, 10, None), (2, 7, None)] * 2)]
    texts = [f"{w} in Python" for w in ("sorting", "threads", "regular expressions", "decimal arithmetic", "file paths", "unit tests")]
    assert held_service.health()["shard_groups"][0]["vectors"] == index.ntotal
    for client in (service, held_service):
        alone = [client.search(texts=[t], k=5) for t in texts]
        with ThreadPoolExecutor(8) as pool:
            vector_answers = list(pool.map(lambda s: client.search(embeddings=queries[s[0] : s[0] + s[1]], k=s[2], nprobe=s[3]), shapes))
            text_answers = list(pool.map(lambda t: client.search(texts=[t], k=5), texts))
        for (i, n, k, nprobe), answer in zip(shapes, vector_answers):
            dists, ids = index.search(queries[i : i + n], k, nprobe=nprobe)
            assert [[hit["chunk_id"] for hit in row] for row in answer] == [list(row[row >= 0]) for row in ids]
            np.testing.assert_allclose([[hit["distance"] for hit in row] for row in answer], dists, rtol=1e-6)
        for one, batched in zip(alone, text_answers):  # BERT in a batch pads differently: ids, and distances to 1e-4
            assert [h["chunk_id"] for h in batched[0]][:3] == [h["chunk_id"] for h in one[0]][:3]
            np.testing.assert_allclose([h["distance"] for h in batched[0]], [h["distance"] for h in one[0]], rtol=1e-4)


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


@pytest.mark.parametrize("body, status, message", [
    ({"texts": []}, 422, "at least 1"),
    ({"texts": ["x"] * 257}, 422, "at most 256"),
    ({"texts": ["x" * 20000]}, 422, "characters"),
    ({"texts": ["x"], "embeddings": [[0.0]]}, 422, "exactly one"),
    ({"k": 3}, 422, "exactly one"),
    ({"texts": ["x"], "k": 0}, 422, "greater than or equal to 1"),
    ({"texts": ["x"], "k": 101}, 422, "less than or equal to 100"),
    ({"texts": ["x"], "nprobe": 0}, 422, "greater than or equal to 1"),
    ({"texts": ["x"], "nprobe": 60000}, 422, "exceeds the index's"),
    ({"embeddings": [[0.5, 0.5]]}, 422, "384-d"),
    ({"token_ids": [[]]}, 422, "has 0 tokens"),
    ({"token_ids": [[1, 10**6]]}, 422, "vocabulary size"),
    ({"texts": ["x"], "colour": "blue"}, 422, "Extra inputs"),
])
def test_bad_searches_get_4xx_saying_what_is_wrong(service, body, status, message):
    response = requests.post(service.url + "/v1/search", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert message in response.text


def test_malformed_requests_and_unknown_ids(service):
    r = requests.post(service.url + "/v1/search", data="{texts: [", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "JSON decode error" in r.text
    r = requests.post(service.url + "/v1/search", data='{"embeddings": [[NaN' + ", 0.0" * 383 + "]]}", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "finite" in r.text
    r = requests.get(service.url + "/v1/chunks/123456789", timeout=30)
    assert r.status_code == 404 and "chunk 123456789 does not exist" in r.text
    assert requests.get(service.url + "/v1/chunks/-1", timeout=30).status_code == 422
    r = requests.post(service.url + "/v1/documents/delete", json={"doc_ids": [10**9]}, timeout=30)
    assert r.status_code == 404 and "unknown document ids: [1000000000]" in r.text


def test_openapi_schema_and_metrics(service):
    schema = requests.get(service.url + "/openapi.json", timeout=30).json()
    assert {"/v1/search", "/v1/chunks/{chunk_id}", "/v1/documents/delete", "/healthz", "/metrics"} <= set(schema["paths"])
    service.search(texts=["counted"], k=1)
    metrics = requests.get(service.url + "/metrics", timeout=30).text
    ok = [line for line in metrics.splitlines() if line.startswith('retro_index_requests_total{endpoint="/v1/search",status="200"}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    assert 'retro_index_queries_total{kind="texts"}' in metrics


def test_deleted_documents_never_come_back(service, service_db):
    from retro_db.search import RetrievalIndex
    from retro_db.token_store import TokenStore

    queries = _valid_queries(service_db, 8)
    before = service.search(embeddings=queries, k=10)
    victims = sorted({before[0][0]["doc_id"], before[1][0]["doc_id"]})
    victim_chunks, _ = TokenStore(service_db).chunks_of_documents(victims)
    counts = service.delete_documents(victims)
    assert counts["documents_deleted"] == len(victims) and counts["chunks_deleted"] == len(victim_chunks)
    after = service.search(embeddings=queries, k=10)
    assert all(len(row) == 10 for row in after)  # removed inside faiss: still k results
    assert not {h["doc_id"] for row in after for h in row} & set(victims)
    with pytest.raises(Exception, match="was deleted"):
        service.chunk(int(victim_chunks[0]))
    # persisted: a fresh process (a restarted replica, a training job) sees the deletion
    _, ids = RetrievalIndex(service_db).search(queries, 50)
    assert not np.isin(ids, victim_chunks).any()
    assert service.delete_documents(victims)["documents_deleted"] == 0  # idempotent


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
    entry = add_documents([str(corpus)], service_db, name="zorblax", beam_args=BEAM_TEST_ARGS)
    assert entry["documents"] == 2 and entry["rejected"] == {"rejected_exact_duplicate": 1}
    assert entry["first_chunk_id"] >= n_chunks_before

    hits = service.search(texts=["zorblax protocol quibbles and frobnicators"], k=2)[0]
    assert hits[0]["chunk_id"] >= entry["first_chunk_id"] and "zorblax" in hits[0]["text"]
    assert service.health()["vectors"] == vectors_before + entry["vectors"]
    assert service.chunk(kept) == chunk_before  # existing ids unchanged
    assert add_documents([str(corpus)], service_db, name="zorblax") == entry  # rerun: nothing to do


def test_generation_through_the_service_client_equals_local_retrieval(service, service_db):
    import torch

    from model.generate import generate
    from model.model import Retro, tiny_config
    from model.retrieval import LocalRetriever, ServiceRetriever
    from retro_db.tokenizer import PAD, load_lm_tokenizer, special_id

    tokenizer = load_lm_tokenizer(os.path.join(service_db, "tokenizer.json"))
    pad = special_id(tokenizer, PAD)
    torch.manual_seed(0)
    model = Retro(tiny_config(vocab_size=tokenizer.get_vocab_size(), pad_id=pad))
    prompt = tokenizer.encode("Python's for statement iterates over the items of any sequence, in order. " * 3).ids
    local = generate(model, prompt, LocalRetriever(service_db, k=2), max_new_tokens=140)
    remote = generate(model, prompt, ServiceRetriever.for_db(service.url, service_db, k=2), max_new_tokens=140)
    assert local[0] == remote[0]
    retrieved = [(ids.tolist(), rows.tolist()) for ids, rows in (h for h in local[1] if h is not None)]
    assert len(retrieved) >= 2
    assert retrieved == [(ids.tolist(), rows.tolist()) for ids, rows in (h for h in remote[1] if h is not None)]


def test_fuzz_against_own_openapi_schema_finds_no_5xx(service):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    tried = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def no_server_error(case):
                nonlocal tried
                tried += 1
                response = case.call(base_url=service.url, timeout=60)
                assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:500])

            try:
                no_server_error()
            except Unsatisfiable:  # no negative inputs exist for an operation without parameters
                pass
    assert tried >= 200


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
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as serve_builds  # what serve run/deploy call

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
