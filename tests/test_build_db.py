"""Stages 2-4 on a small real DB: embeddings, index recall, neighbour tables, resumability, errors."""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import BEAM_TEST_ARGS, BLOCK_ROWS, COPIED_DOCS, REPO, default_corpus_docs
from model.data import RetroSequences
from pipeline import chunk_pipeline as cp
from pipeline.embed import EmbedConfig, write_embeddings
from pipeline.index_build import IndexConfig, default_factory, indexable_rows, write_index
from pipeline.index_recall import exact_top_k, recall_at_k
from pipeline.neighbours import neighbours_of
from pipeline.stage import ConfigMismatch
from retro_db import deletions
from retro_db.corpus import normalize_text
from retro_db.deletions import delete_documents
from retro_db.layout import chunk_shard_files
from retro_db.manifest import read_manifest, write_manifest
from retro_db.search import RetrievalIndex, load_embedding_rows, search_defaults
from retro_db.token_store import ShardedRows, TokenStore
from retro_db.tokenizer import PAD, load_lm_tokenizer, special_id


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def digests(db, kind):
    return {
        os.path.relpath(p, db): sha(p)
        for p in sorted(glob.glob(os.path.join(db, kind, "*", "*.*")))
        if not p.endswith(".tmp")
    }


def neighbour_table(db, split):
    tables = [pq.read_table(f) for f in sorted(glob.glob(os.path.join(db, "neighbours", split, "*.parquet")))]
    ids = np.concatenate([np.array(t["neighbour_ids"].to_pylist(), dtype=np.int64) for t in tables])
    chunk_ids = np.concatenate([t["chunk_id"].to_numpy() for t in tables])
    return chunk_ids, ids


def test_embeddings_align_with_chunks_and_match_a_direct_forward(db):
    from retro_db.embedder import ChunkEmbedder

    manifest = read_manifest(db)["stages"]
    assert manifest["embeddings"]["counts"]["chunks"] == manifest["chunks"]["counts"]["chunks"]
    first = chunk_shard_files(db, "train")[0]
    tokens = pq.read_table(first)["tokens"].to_pylist()[:8]
    stored = np.load(sorted(glob.glob(os.path.join(db, "embeddings", "train", "*.npy")))[0])[:8].astype(np.float32)
    direct = ChunkEmbedder(lm_tokenizer_json=open(os.path.join(db, "tokenizer.json")).read()).embed_token_chunks(tokens)
    assert stored.shape == (8, 384)
    np.testing.assert_allclose(stored, direct, atol=2e-2, rtol=1e-2)  # fp16 storage


def test_recall_at_10_is_at_least_0_9_at_the_default_nprobe(db):
    stage = read_manifest(db)["stages"]["index"]
    assert stage["recall_at_10"] >= 0.9
    # recomputed here against a numpy brute force, independent of the build's own measurement
    index = RetrievalIndex(db)
    rows = [indexable_rows(f) for f in chunk_shard_files(db, ("train", "retrieval"))]
    vectors, ids = np.concatenate([v for v, _ in rows]), np.concatenate([i for _, i in rows])
    stored = load_embedding_rows(db, ("train", "retrieval"))
    assert len(ids) < sum(len(a) for a in stored.arrays)  # chunks holding only <|endoftext|> are left out
    queries = np.concatenate(
        [
            np.load(p).astype(np.float32)
            for p in glob.glob(os.path.join(db, "embeddings", "valid", "*.npy"))
            + glob.glob(os.path.join(db, "embeddings", "test", "*.npy"))
        ]
    )
    d = ((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    exact = ids[np.argsort(d, axis=1)[:, :10]]
    _, found = index.search(queries, 10)
    assert recall_at_k(found, exact) >= 0.9
    assert index.ntotal == len(vectors)


def test_where_no_nprobe_reaches_the_target_the_index_stage_reranks_deeper_and_search_uses_its_choice(db, tmp_path):
    """An index whose PQ codes are too coarse for recall@10 0.8 at any nprobe with a top 10 re-ranked (factor 1):
    the stage doubles the re-ranking depth until an nprobe reaches it, records the choice, and a
    ``RetrievalIndex`` opened with the DB's defaults searches with it (recall recomputed here against
    a numpy brute force)."""
    work = str(tmp_path / "db")
    shutil.copytree(db, work, ignore=shutil.ignore_patterns("index", "neighbours", "deleted"))
    config = IndexConfig(factory="IVF8,PQ4x4np", rerank_factor=1, target_recall=0.8)
    stage = write_index(work, config=config, overwrite=True)
    factor = stage["default_rerank_factor"]
    assert 1 < factor <= config.max_rerank_factor and stage["recall_at_10"] >= 0.8
    tried = {r["rerank_factor"] for r in stage["recall_grid"]}
    assert tried == {2**i for i in range(factor.bit_length())}  # 1, 2, ... doubled up to the choice
    assert all(r["recall@10_reranked"] < 0.8 for r in stage["recall_grid"] if r["rerank_factor"] < factor)
    index = RetrievalIndex(work)
    assert (index.rerank_factor, search_defaults(read_manifest(work))) == (factor, (stage["default_nprobe"], factor))
    rows = [indexable_rows(f) for f in chunk_shard_files(work, ("train", "retrieval"))]
    vectors, ids = np.concatenate([v for v, _ in rows]), np.concatenate([i for _, i in rows])
    queries = np.concatenate(
        [np.load(p).astype(np.float32) for p in glob.glob(os.path.join(work, "embeddings", "test", "*.npy"))]
    )
    exact = ids[np.argsort(((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(-1), axis=1)[:, :10]]
    assert recall_at_k(index.search(queries, 10)[1], exact) >= 0.75  # other queries than the stage's sample
    assert recall_at_k(RetrievalIndex(work, rerank_factor=1).search(queries, 10)[1], exact) < 0.8


def test_an_hnsw_coarse_quantizer_reaches_the_same_recall_and_honours_deletions(db, tmp_path):
    # The default factory switches to it from 2^16 lists (n >= 2^28); forced here on the small DB.
    assert default_factory(2**30, 384) == "IVF131072_HNSW32,PQ48x8np"
    assert default_factory(10**6, 384) == "IVF2048,PQ48x8np"
    work = str(tmp_path / "db")
    shutil.copytree(db, work, ignore=shutil.ignore_patterns("index", "neighbours", "deleted"))
    stage = write_index(work, config=IndexConfig(factory="IVF64_HNSW32,PQ48x8np"), overwrite=True)
    assert stage["config"]["factory"] == "IVF64_HNSW32,PQ48x8np"
    assert stage["recall_at_10"] >= 0.9
    store = TokenStore(work)
    queries = np.load(sorted(glob.glob(os.path.join(work, "embeddings", "valid", "*.npy")))[0])[:16].astype(np.float32)
    _, before = RetrievalIndex(work).search(queries, 10)
    hit_doc = int(store.doc_of(before[0, :1])[0])
    delete_documents(work, [hit_doc], store, reason="test", actor="test")
    _, after = RetrievalIndex(work).search(queries, 10)
    assert (after >= 0).all() and not np.isin(store.doc_of(after.reshape(-1)), [hit_doc]).any()


def test_no_neighbour_comes_from_its_own_document_and_continuations_do(db):
    store = TokenStore(db)
    pad = special_id(load_lm_tokenizer(os.path.join(db, "tokenizer.json")), PAD)
    for split, k in (("train", 2), ("valid", 10), ("test", 10)):
        chunk_ids, ids = neighbour_table(db, split)
        assert ids.shape == (len(chunk_ids), k)
        own = store.doc_of(chunk_ids)
        valid = ids >= 0
        assert valid.all(), "the test DB has enough other documents for every chunk"
        assert not np.any(store.doc_of(ids[valid]) == np.repeat(own, k)[valid.reshape(-1)])
        flat = ids.reshape(-1)
        cont, lengths = store.continuations(flat, pad)
        has_cont = lengths > 0
        assert np.all(store.doc_of(flat[has_cont] + 1) == store.doc_of(flat[has_cont]))
        assert np.all(cont[~has_cont] == pad)
    assert read_manifest(db)["stages"]["neighbours"]["counts"]["coverage"] == 1.0


def documents_of(db, split):
    files = sorted(glob.glob(os.path.join(db, "documents", split, "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def test_copies_of_train_documents_are_retrieved_but_never_trained_on(db):
    """The fixture wrote documents 2-4 (train) and 12, 18 (valid, test) twice (conftest.COPIED_DOCS)."""
    copied = {normalize_text(default_corpus_docs(130)[i]["text"]) for i in COPIED_DOCS}
    copied_hashes = {hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in copied}  # the key, computed apart
    docs = {split: documents_of(db, split) for split in ("train", "valid", "test", "retrieval")}
    by_hash = {split: {d["doc_hash"]: d for d in rows} for split, rows in docs.items()}
    assert {d["doc_hash"] for d in docs["retrieval"]} == copied_hashes & set(by_hash["train"]) and len(
        docs["retrieval"]
    ) == 3
    assert len(copied_hashes - set(by_hash["train"])) == 2 and copied_hashes - set(by_hash["train"]) <= set(
        by_hash["valid"]
    ) | set(by_hash["test"])
    rejected = [
        json.loads(line) for f in glob.glob(os.path.join(db, "rejected", "exact_duplicate-*.jsonl")) for line in open(f)
    ]
    assert len(rejected) == 2  # the copies of the valid and the test document
    # retrieval ids follow the test split's: every id the model trains or is evaluated on is what it was before
    assert min(d["doc_id"] for d in docs["retrieval"]) > max(
        d["doc_id"] for split in ("train", "valid", "test") for d in docs[split]
    )

    store = TokenStore(db)
    pad = special_id(load_lm_tokenizer(os.path.join(db, "tokenizer.json")), PAD)
    chunk_ids, ids = neighbour_table(db, "train")
    row_of = {int(c): i for i, c in enumerate(chunk_ids)}
    sequences = RetroSequences(db, "train", k=2)
    trained = set(range(sequences.first, sequences.first + sequences.n_chunks))
    indexed = {
        int(i) for f in chunk_shard_files(db, "retrieval") for i in indexable_rows(f)[1]
    }  # not those holding only <|endoftext|>
    for copy in docs["retrieval"]:
        original = by_hash["train"][copy["doc_hash"]]
        copy_chunks = set(range(copy["first_chunk_id"], copy["first_chunk_id"] + copy["n_chunks"]))
        assert not copy_chunks & trained
        for i in range(original["n_chunks"]):
            if copy["first_chunk_id"] + i in indexed:  # the identical chunk is retrieved (squared L2 0)
                assert copy["first_chunk_id"] + i in ids[row_of[original["first_chunk_id"] + i]]
        assert len(indexed & copy_chunks) >= copy["n_chunks"] - 1
        # what conditions the original's chunk i in training: the copy's chunk i and its continuation,
        # which is the original's chunk i + 1 token for token
        if original["n_chunks"] > 1:
            nb = sequences.neighbour_ids(np.array([original["first_chunk_id"]]))[0]
            assert copy["first_chunk_id"] in nb
            cont, n = store.continuations(np.array([copy["first_chunk_id"]]), pad)
            nxt, m = store.chunks([original["first_chunk_id"] + 1])
            assert n[0] == m[0] and np.array_equal(cont[0][: n[0]], nxt[0][: m[0]])
    for split in ("valid", "test"):  # no held-out chunk is a query of the copy, and none is a copy
        assert not np.isin(neighbour_table(db, split)[0], [d["first_chunk_id"] for d in docs["retrieval"]]).any()
    assert not glob.glob(os.path.join(db, "neighbours", "retrieval", "*"))
    assert glob.glob(os.path.join(db, "index", "retrieval", "*.faissindex"))


def test_deleting_a_document_deletes_its_copies_and_restoring_it_restores_them(db, tmp_path):
    work = str(tmp_path / "db")
    shutil.copytree(db, work)
    copy = documents_of(work, "retrieval")[0]
    original = next(d for d in documents_of(work, "train") if d["doc_hash"] == copy["doc_hash"])
    both = [original["doc_id"], copy["doc_id"]]
    store = TokenStore(work)
    chunks, _ = store.chunks_of_documents(both)
    query = np.asarray(load_embedding_rows(work, "retrieval").get([copy["first_chunk_id"]]), dtype=np.float32)
    assert np.isin(RetrievalIndex(work).search(query, 10)[1], chunks).any()

    entry = delete_documents(work, [original["doc_id"]], store, reason="test: offending text", actor="test")
    assert (entry["doc_ids"], entry["copies"], entry["documents"], entry["chunks"]) == (
        [original["doc_id"]],
        [copy["doc_id"]],
        2,
        len(chunks),
    )
    assert np.array_equal(deletions.deleted_chunk_ids(work), np.sort(chunks))
    assert not np.isin(
        RetrievalIndex(work).search(query, 10)[1], chunks
    ).any()  # neither the text nor its copy is served
    entry = deletions.change(work, [original["doc_id"]], store, action="restore", reason="test: back", actor="test")
    assert (entry["copies"], entry["documents"]) == ([copy["doc_id"]], 2) and not len(deletions.deleted_chunk_ids(work))


def test_padding_only_where_fewer_than_k_candidates_remain(db):
    index, store = RetrievalIndex(db), TokenStore(db)
    query = np.load(glob.glob(os.path.join(db, "embeddings", "valid", "*.npy"))[0])[:3].astype(np.float32)
    indexed = np.concatenate([ids for _, ids in (indexable_rows(f) for f in chunk_shard_files(db, "train"))])
    n_docs = int(store.doc_of(indexed).max()) + 1
    # every document but one shares the query's document id: only one document's chunks remain
    lonely_doc = int(store.doc_of([0])[0])
    doc_of = lambda ids: np.where(store.doc_of(ids) == lonely_doc, lonely_doc, n_docs + 7)  # noqa: E731
    lonely_chunks = int((store.doc_of(indexed) == lonely_doc).sum())
    k = lonely_chunks + 3
    nlist = faiss.extract_index_ivf(index.shards[0].index).nlist  # exhaustive: every chunk is reachable
    ids, dists = neighbours_of(
        index, query, np.full(3, n_docs + 7), doc_of, k=k, candidates=8, max_candidates=index.ntotal, nprobe=nlist
    )
    assert np.all(ids[:, :lonely_chunks] >= 0) and np.all(ids[:, lonely_chunks:] == -1)
    assert np.all(np.isinf(dists[:, lonely_chunks:])) and np.all(
        store.doc_of(ids[:, :lonely_chunks].reshape(-1)) == lonely_doc
    )


def test_sharded_rows_given_out_of_order_find_every_row():
    rows = ShardedRows([np.arange(3) + 100, np.arange(5)], starts=[5, 0])
    assert rows.ends.tolist() == [5, 8]
    assert rows.get([0, 4, 5, 7]).tolist() == [0, 4, 100, 102]
    with pytest.raises(KeyError):
        rows.get([8])


def test_exact_search_streamed_over_shards_equals_numpy_brute_force():
    rng = np.random.default_rng(0)
    vectors, queries = (
        rng.standard_normal((3000, 16), dtype=np.float32),
        rng.standard_normal((50, 16), dtype=np.float32),
    )
    ids = rng.permutation(10**6)[:3000].astype(np.int64)  # chunk ids need not be contiguous
    shards = ((vectors[a:b], ids[a:b]) for a, b in ((0, 1000), (1000, 1003), (1003, 3000)))  # one of 3 < k
    dists, found, qps = exact_top_k(shards, queries, 10)
    reference = ((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    order = np.argsort(reference, axis=1)[:, :10]
    assert np.array_equal(found, ids[order]) and qps > 0
    np.testing.assert_allclose(dists, np.take_along_axis(reference, order, 1), rtol=1e-4, atol=1e-4)


def test_token_store_matches_the_parquet_shards(db):
    store = TokenStore(db)
    table = pq.read_table(chunk_shard_files(db, "valid")[0])
    ids = table["chunk_id"].to_numpy()[::3]
    tokens, lengths = store.chunks(ids)
    expected = table["tokens"].to_pylist()[::3]
    assert [list(t[:n]) for t, n in zip(tokens, lengths)] == expected
    r = store.neighbour_tokens(np.array([ids[0], -1]), pad_id=1)
    assert r.shape == (2, 128) and np.all(r[1] == 1)
    with pytest.raises(KeyError):
        store.chunks([len(store) + 5])


def test_alignment_finds_how_far_a_query_is_moved_against_the_document_it_retrieved(db):
    store = TokenStore(db)
    m = store.chunk_size
    # a document of at least 4 chunks, read from the Parquet shards (not the token store)
    table = pq.read_table(chunk_shard_files(db, "train")[0], columns=["chunk_id", "doc_id", "tokens"])
    by_doc = {}
    for cid, doc, tokens in zip(*(table[c].to_pylist() for c in ("chunk_id", "doc_id", "tokens"))):
        by_doc.setdefault(doc, []).append((cid, tokens))
    chunks = next(v for v in by_doc.values() if len(v) >= 4 and all(len(t) == m for _, t in v[:3]))
    n = chunks[1][0]  # chunk 1: chunk 0 lies before it, chunks 2 and 3 after
    text = [t for _, tokens in chunks[:4] for t in tokens]  # chunks n-1 .. n+2
    cases = {
        0: text[m : 2 * m],
        17: text[m + 17 : 2 * m + 17],
        -23: text[m - 23 : 2 * m - 23],
        m - 1: text[2 * m - 1 : 3 * m - 1],
    }
    cases[-3] = [7, 8, 9] + text[m : 2 * m - 3]  # an edit: three tokens inserted before the chunk's text
    queries = list(cases.values())
    unrelated = list(range(100, 100 + m))
    shifts = store.alignment_shifts(
        np.array([n] * len(queries) + [n, -1]),
        [np.array(q) for q in queries] + [np.array(unrelated), np.array(queries[0])],
    )
    assert shifts.tolist() == list(cases) + [0, 0]
    rows = store.shifted_neighbour_tokens(np.array([n] * len(cases)), shifts[: len(cases)], pad_id=1)
    for (shift, query), row in zip(cases.items(), rows):  # the moved window holds the query's text, and what follows it
        start = m + shift
        assert row.tolist() == text[start : start + 2 * m] + [1] * (2 * m - len(text[start : start + 2 * m]))


def run_cli(*args, kill_when=None):
    cmd = [sys.executable, "-m", "pipeline", *args]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if kill_when is None:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not kill_when():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


def test_killed_embedding_and_neighbour_runs_resume_to_identical_outputs(db, tmp_path):
    work = str(tmp_path / "db")
    shutil.copytree(os.path.join(os.path.dirname(db), "chunks-only"), work)
    blocks = lambda: glob.glob(os.path.join(work, "embeddings", "*", "*.blocks", "block-*.npz"))  # noqa: E731
    run_cli("embed", "--db", work, "--embed-block-rows", str(BLOCK_ROWS), kill_when=lambda: len(blocks()) >= 2)
    assert read_manifest(work)["stages"]["embeddings"]["status"] == "running"
    done = run_cli("embed", "--db", work, "--embed-block-rows", str(BLOCK_ROWS))
    assert done.returncode == 0, done.stderr[-2000:]
    assert digests(work, "embeddings") == digests(db, "embeddings")
    assert run_cli("index", "--db", work).returncode == 0
    assert digests(work, "index") == digests(db, "index")
    shards = lambda: glob.glob(os.path.join(work, "neighbours", "*", "*.parquet"))  # noqa: E731
    run_cli("neighbours", "--db", work, kill_when=lambda: len(shards()) >= 1)
    assert run_cli("neighbours", "--db", work).returncode == 0
    assert digests(work, "neighbours") == digests(db, "neighbours")


def test_corrupt_or_missing_shards_and_foreign_tokenizer_or_model_are_named(db, tmp_path):
    work = str(tmp_path / "db")
    shutil.copytree(os.path.join(os.path.dirname(db), "chunks-only"), work)
    victim = chunk_shard_files(work, "train")[0]
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 64)
        f.truncate(200)
    with pytest.raises(ValueError, match=os.path.basename(victim)):
        write_embeddings(work, config=EmbedConfig(block_rows=BLOCK_ROWS))

    foreign = str(tmp_path / "foreign")
    shutil.copytree(os.path.join(os.path.dirname(db), "chunks-only"), foreign)
    with open(os.path.join(foreign, "tokenizer.json"), "w") as f:
        f.write(load_lm_tokenizer(os.path.join(db, "tokenizer.json")).to_str().replace('"<|pad|>"', '"<|padding|>"'))
    with pytest.raises(ValueError, match="tokenizer"):
        write_embeddings(foreign)

    built = str(tmp_path / "built")
    shutil.copytree(db, built)
    with pytest.raises(ConfigMismatch, match="model"):
        write_embeddings(built, config=EmbedConfig(model="bert-base-cased", block_rows=BLOCK_ROWS))
    os.remove(glob.glob(os.path.join(built, "embeddings", "train", "*.npy"))[0])
    manifest = read_manifest(built)
    manifest["stages"].pop("index")
    write_manifest(built, manifest)
    with pytest.raises(FileNotFoundError, match=r"embeddings/train/shard-\d+"):
        write_index(built)


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": ""}\n')
    db = str(tmp_path / "db")
    tok = str(tmp_path / "tok.json")
    from pipeline.lm_tokenizer import train_lm_tokenizer

    train_lm_tokenizer(["a few words of text"] * 5, vocab_size=300).save(tok)
    cp.write_chunk_shards([str(tmp_path / "in.jsonl")], db, tokenizer_path=tok, beam_args=BEAM_TEST_ARGS)
    with pytest.raises(ValueError, match="no chunk shards to embed"):
        write_embeddings(db)


def test_rerank_of_a_request_at_the_api_limits_stays_in_bounded_blocks_and_is_exact(db):
    import tracemalloc

    from index_service import api
    from retro_db.search import RERANK_BLOCK_BYTES, load_indexed_vectors, rerank

    vectors = load_indexed_vectors(db)
    rng = np.random.default_rng(0)
    n, c, k = api.MAX_QUERIES, api.MAX_K * 4, api.MAX_K  # 256 queries, k = 100, re-rank factor 4
    queries = rng.standard_normal((n, 384)).astype(np.float32)
    stored = np.concatenate(
        [np.arange(a, b) for a, b in zip(vectors.starts, vectors.ends)]
    )  # train, then retrieval ids
    ids = np.stack([rng.permutation(stored)[:c] for _ in range(n)])  # distinct candidates, as merged ones are
    ids[:, -5:] = -1  # padding, as from a shard with fewer candidates
    tracemalloc.start()
    dists, top = rerank(vectors, queries, ids, k)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * RERANK_BLOCK_BYTES < 2 * n * c * 384 * 4  # one (n, c, d) array alone would be 157 MB
    for i in (0, 77, n - 1):  # each row against plain numpy: exact squared L2, nearest first, ties by id
        cand = ids[i][ids[i] >= 0]
        d = ((vectors.get(cand).astype(np.float32) - queries[i]) ** 2).sum(1)
        order = np.lexsort((cand, d))[:k]
        np.testing.assert_array_equal(top[i], cand[order])
        np.testing.assert_allclose(dists[i], d[order], rtol=1e-5)


def test_retrieval_index_threads_hold_on_any_calling_thread(db):
    """OpenMP's thread count is per thread: set once in the constructor, a search from a worker thread
    (a thread pool, a closed-loop benchmark client) silently ran on the cores' count."""
    import threading

    import faiss

    from retro_db.search import RetrievalIndex

    index = RetrievalIndex(db, threads=3)  # a count no default here has (OpenMP allows more threads than cores)
    seen = {}

    def worker():
        seen["before"] = faiss.omp_get_max_threads()
        index.search(np.zeros((2, index.dim), np.float32), 3)
        seen["after"] = faiss.omp_get_max_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["before"] != 3 and seen["after"] == 3
