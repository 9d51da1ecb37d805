"""The GPU code paths, exercised on the CPU where faiss allows: the device choice, index training
through explicit assignment indexes, search without an id selector, threaded tokenization."""

import faiss
import numpy as np
import pytest

from pipeline.index_build import train_index
from retro_db.embedder import ChunkEmbedder
from retro_db.manifest import read_manifest
from retro_db.search import (
    RetrievalIndex,
    drop_deleted,
    faiss_gpus,
    load_embedding_rows,
    rerank,
    resolve_device,
    search_shards,
)
from retro_db.token_store import TokenStore
from retro_db.tokenizer import db_tokenizer


def test_device_choice_is_automatic_and_recorded(db):
    assert faiss_gpus() == 0  # faiss-cpu here
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="faiss sees no GPU"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="use auto, cpu or gpu"):
        resolve_device("tpu")
    stages = read_manifest(db)["stages"]
    assert stages["index"]["train_device"] == "cpu" and stages["neighbours"]["search_device"] == "cpu"


def test_training_through_assignment_indexes_gives_faiss_default_bytes(db):
    sample = np.asarray(np.concatenate(load_embedding_rows(db, "train").arrays), dtype=np.float32)
    trained = []
    for explicit in (False, True):
        index = faiss.index_factory(sample.shape[1], "IVF32,PQ48x8np")
        faiss.downcast_index(faiss.extract_index_ivf(index)).pq.cp.min_points_per_centroid = 1
        if explicit:
            train_index(index, sample, "cpu")  # the GPU path's code, its flat indexes on the CPU
        else:
            index.train(sample)  # faiss's own training: the reference
        trained.append(faiss.serialize_index(index).tobytes())
    assert trained[0] == trained[1]


def test_filtering_deleted_ids_after_search_matches_the_selector(db):
    index = RetrievalIndex(db)
    queries = np.asarray(load_embedding_rows(db, "valid").arrays[0][:64], dtype=np.float32)
    c = 4 * 10
    _, plain_ids = search_shards(index.shards, queries, c, nprobe=index.nprobe)
    deleted = np.unique(plain_ids[:8, :3])  # deletions that hit the first queries' candidates
    with_selector = rerank(
        index.vectors,
        queries,
        search_shards(
            index.shards, queries, c, nprobe=index.nprobe, selector=faiss.IDSelectorNot(faiss.IDSelectorBatch(deleted))
        )[1],
        10,
    )
    dists, ids = drop_deleted(
        *search_shards(index.shards, queries, c, nprobe=index.nprobe), deleted
    )  # the GPU search's filter
    filtered = rerank(index.vectors, queries, ids, 10)
    assert not np.isin(filtered[1], deleted).any() and not np.isin(with_selector[1], deleted).any()
    untouched = ~np.isin(plain_ids, deleted).any(axis=1)  # queries none of whose candidates were deleted
    assert untouched.sum() > 20 and np.array_equal(filtered[1][untouched], with_selector[1][untouched])
    assert all(((row >= 0)[:-1] >= (row >= 0)[1:]).all() for row in ids)  # kept candidates first, padding after


def test_threaded_tokenization_gives_the_same_ids_and_vectors(db):
    store, tokenizer = TokenStore(db), db_tokenizer(db)
    tokens, lengths = store.chunks(np.arange(200))
    texts = tokenizer.decode_batch([t[:n].tolist() for t, n in zip(tokens, lengths)])
    one, two = ChunkEmbedder(batch_size=8, tokenizer_threads=1), ChunkEmbedder(batch_size=8, tokenizer_threads=3)
    assert two.tokenize(texts) == one.tokenize(texts)
    assert np.array_equal(two.embed_texts(texts), one.embed_texts(texts))
