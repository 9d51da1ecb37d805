"""The service's answers shaped without Ray or Serve (``index_service.results``, ``index_service.served_db``),
checked against the DB's Parquet shards read directly and the tokenizer's own decoding."""

import glob
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def parquet_chunks(db):
    """{chunk id: (doc id, tokens)} of every chunk, read from the chunk shards (not the token store)."""
    rows = {}
    for path in glob.glob(os.path.join(db, "chunks", "*", "*.parquet")):
        for r in pq.read_table(path, columns=["chunk_id", "doc_id", "tokens"]).to_pylist():
            rows[r["chunk_id"]] = (r["doc_id"], r["tokens"])
    return rows


@pytest.fixture(scope="module")
def shaping(db):
    from index_service.results import ResultBuilder
    from index_service.served_db import ServedDB
    from retro_db.tokenizer import db_tokenizer

    tokenizer = db_tokenizer(db)
    return ResultBuilder(tokenizer), ServedDB(db), tokenizer


def decoded(tokenizer, tokens) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=False)


def test_the_shaping_modules_import_without_ray_or_serve():
    code = "import sys; sys.modules['ray'] = None; import index_service.results, index_service.served_db"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_chunks_carry_their_text_and_the_next_chunk_of_their_document(shaping, parquet_chunks):
    results, served, tokenizer = shaping
    ids = np.array(sorted(parquet_chunks)[:40:3] + [max(parquet_chunks)])
    out = results.chunks(served.view.store, ids, with_tokens=True)
    assert [c["chunk_id"] for c in out] == ids.tolist()
    for c in out:
        doc, tokens = parquet_chunks[c["chunk_id"]]
        following = parquet_chunks.get(c["chunk_id"] + 1)
        continuation = following[1] if following is not None and following[0] == doc else []
        assert (c["doc_id"], c["tokens"], c["continuation_tokens"]) == (doc, tokens, continuation)
        assert (c["text"], c["continuation"]) == (decoded(tokenizer, tokens), decoded(tokenizer, continuation))
    assert "tokens" not in results.chunks(served.view.store, ids[:1], with_tokens=False)[0]


def test_search_results_skip_missing_neighbours_and_keep_each_distance(shaping, parquet_chunks):
    results, served, _ = shaping
    some = sorted(parquet_chunks)[5:9]
    ids = np.array([[some[0], some[1], -1], [-1, -1, -1], [some[2], some[3], some[0]]])
    dists = np.array([[0.5, 1.5, np.inf], [np.inf] * 3, [0.25, 0.75, 2.0]], dtype=np.float32)
    out = results.search_results(served.view.store, dists, ids, with_tokens=False)
    assert [[(h["chunk_id"], h["distance"]) for h in row] for row in out] == [
        [(some[0], 0.5), (some[1], 1.5)],
        [],
        [(some[2], 0.25), (some[3], 0.75), (some[0], 2.0)],
    ]


def test_a_chunks_neighbours_show_the_window_the_model_read_and_its_source(shaping, db):
    from model.retrieval import Neighbours

    results, served, tokenizer = shaping
    store, m = served.view.store, served.view.store.chunk_size
    train = pq.read_table(glob.glob(os.path.join(db, "chunks", "train", "*.parquet"))[0]).to_pylist()
    first, second = train[0], train[1]
    assert first["doc_id"] == second["doc_id"]  # a document of several chunks: its window can move
    pad = results.pad_id
    shifted = np.full(2 * m, pad)  # the window moved 8 tokens on, as alignment would
    window = (first["tokens"] + second["tokens"])[8 : 8 + 2 * m]
    shifted[: len(window)] = window
    rows = np.stack([store.neighbour_tokens([first["chunk_id"]], pad)[0], shifted, np.full(2 * m, pad)])
    hit = Neighbours(
        np.array([first["chunk_id"], first["chunk_id"], -1]), rows, np.array([1.0, 2.0, 3.0]), np.array([0, 8, 0])
    )
    out = results.neighbours(store, served.view.documents, hit)
    assert [(n["chunk_id"], n["shift"], n["distance"]) for n in out] == [
        (first["chunk_id"], 0, 1.0),
        (first["chunk_id"], 8, 2.0),
    ]
    assert out[0]["text"] == decoded(tokenizer, first["tokens"])
    assert out[1]["text"] == decoded(tokenizer, [t for t in shifted[:m] if t != pad])
    assert out[1]["continuation"] == decoded(tokenizer, [t for t in shifted[m:] if t != pad])
    documents = pq.read_table(glob.glob(os.path.join(db, "documents", "train", "*.parquet"))[0]).to_pylist()
    (source,) = [d for d in documents if d["doc_id"] == first["doc_id"]]
    assert out[0]["source"]["source"] == source["source"] and out[0]["source"]["position"] == source["position"]
    assert results.neighbours(store, served.view.documents, None) == []


def test_text_chunks_split_at_the_chunk_size_and_take_the_neighbours_of_the_chunk_before(shaping):
    from model.retrieval import Neighbours

    results, served, _ = shaping
    pieces = [f"t{i} " for i in range(130)]
    hit = Neighbours(np.array([-1]), np.zeros((1, 2 * 64), np.int64), np.array([np.inf]))
    chunks = results.text_chunks(served.view.store, served.view.documents, pieces, {1: hit}, 64)
    assert [(c["index"], c["start"], c["text"]) for c in chunks] == [
        (u, 64 * u, "".join(pieces[64 * u : 64 * (u + 1)])) for u in range(3)
    ]
    assert all(c["neighbours"] == [] for c in chunks)  # the only hit found nothing


def test_token_scores_give_null_where_nothing_predicts_a_token():
    from index_service.results import token_scores

    out = token_scores(["a", "b"], np.array([np.nan, -0.5]), np.array([np.nan, -1.25]))
    assert out == [
        {"text": "a", "logprob": None, "logprob_no_retrieval": None},
        {"text": "b", "logprob": -0.5, "logprob_no_retrieval": -1.25},
    ]


def test_a_deleted_or_unknown_chunk_is_a_lookup_error_naming_it(db, parquet_chunks):
    from index_service.served_db import ServedDB

    served = ServedDB(db)
    with pytest.raises(LookupError, match="chunk 999999999 does not exist"):
        served.chunk_view(999999999)
    chunk_id = sorted(parquet_chunks)[0]
    assert served.chunk_view(chunk_id) is served.view.store
    served.deleted_docs = {parquet_chunks[chunk_id][0]}  # as a deletion read from DB/deleted sets it
    with pytest.raises(LookupError, match=f"chunk {chunk_id} belongs to document .*, which was deleted"):
        served.chunk_view(chunk_id)
