"""The device code paths. Everywhere: the device choice (what this machine has), index training through
explicit assignment indexes, search without an id selector, threaded tokenization, all exercised on the CPU
where faiss allows. On a machine with a GPU (faiss's GPU build, CUDA torch) also the GPU paths themselves:
index training and search, neighbours, embedding, bf16 training, each against the CPU's answer."""

import os

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.index_build import train_index
from pipeline.index_recall import recall_at_k
from retro_db.embedder import ChunkEmbedder
from retro_db.manifest import read_manifest, write_manifest
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

GPUS = faiss_gpus()
needs_gpu = pytest.mark.skipif(not GPUS or not torch.cuda.is_available(), reason="no GPU (faiss-gpu and CUDA torch)")


def test_device_choice_is_automatic_and_recorded(db):
    expected = "gpu" if GPUS else "cpu"
    assert resolve_device("auto") == expected and resolve_device("cpu") == "cpu"
    if GPUS:
        assert resolve_device("gpu") == "gpu"
    else:
        with pytest.raises(ValueError, match="faiss sees no GPU"):
            resolve_device("gpu")
    with pytest.raises(ValueError, match="use auto, cpu or gpu"):
        resolve_device("tpu")
    stages = read_manifest(db)["stages"]
    assert stages["index"]["train_device"] == expected and stages["neighbours"]["search_device"] == expected


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


@needs_gpu
def test_gpu_index_training_and_search_match_the_cpusrecall_at_k(db):
    """The same factory trained on the GPU and on the CPU: recall@10 of both against exact search within 0.03,
    and the GPU-resident shards return the CPU shards' top-10 for almost every query."""
    sample = np.asarray(np.concatenate(load_embedding_rows(db, "train").arrays), dtype=np.float32)
    queries = np.asarray(load_embedding_rows(db, "valid").arrays[0][:200], dtype=np.float32)
    exact = faiss.IndexFlatL2(sample.shape[1])
    exact.add(sample)
    truth = exact.search(queries, 10)[1]
    recalls = {}
    for device in ("cpu", "gpu"):
        index = faiss.index_factory(sample.shape[1], "IVF32,PQ48x8np")
        faiss.downcast_index(faiss.extract_index_ivf(index)).pq.cp.min_points_per_centroid = 1
        train_index(index, sample, device)
        index.add(sample)
        index.nprobe = 8
        recalls[device] = recall_at_k(index.search(queries, 10)[1], truth)
    assert recalls["cpu"] > 0.5 and abs(recalls["gpu"] - recalls["cpu"]) < 0.03, recalls
    on_cpu, on_gpu = RetrievalIndex(db, device="cpu"), RetrievalIndex(db, device="gpu")
    assert on_gpu.shards[0].on_gpu
    cpu_ids, gpu_ids = on_cpu.search(queries, 10)[1], on_gpu.search(queries, 10)[1]
    assert recall_at_k(gpu_ids, cpu_ids) > 0.98


@needs_gpu
def test_neighbours_on_the_gpu_match_the_cpus(db, tmp_path):
    import shutil

    from pipeline.neighbours import write_neighbours
    from retro_db.layout import NEIGHBOURS, aligned_path, chunk_shard_files

    tables = {}
    for device in ("cpu", "gpu"):
        copy = str(tmp_path / device)
        shutil.copytree(db, copy)
        manifest = read_manifest(copy)  # the stage's config holds no device: forget it, or it would skip
        del manifest["stages"]["neighbours"]
        write_manifest(copy, manifest)
        shutil.rmtree(os.path.join(copy, NEIGHBOURS))
        write_neighbours(copy, device=device)
        assert read_manifest(copy)["stages"]["neighbours"]["search_device"] == device
        files = [aligned_path(f, NEIGHBOURS) for f in chunk_shard_files(copy, "train")]
        tables[device] = np.concatenate([np.stack(pq.read_table(f)["neighbour_ids"].to_pylist()) for f in files])
    assert tables["gpu"].shape == tables["cpu"].shape
    assert (tables["gpu"][:, 0] == tables["cpu"][:, 0]).mean() > 0.97


@needs_gpu
def test_embedding_on_the_gpu_matches_the_cpu(db):
    store, tokenizer = TokenStore(db), db_tokenizer(db)
    tokens, lengths = store.chunks(np.arange(256))
    texts = tokenizer.decode_batch([t[:n].tolist() for t, n in zip(tokens, lengths)])
    cpu = ChunkEmbedder(batch_size=64, device="cpu").embed_texts(texts).astype(np.float32)
    gpu = ChunkEmbedder(batch_size=64, device="cuda").embed_texts(texts).astype(np.float32)
    cosine = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cosine.min() > 0.995  # bf16 autocast on the GPU


@needs_gpu
def test_bf16_training_on_the_gpu_follows_fp32_on_the_cpu(db, tmp_path):
    from model.train import TrainConfig, train

    cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=1)
    cpu = train(db, str(tmp_path / "cpu"), cfg=cfg, device="cpu")
    gpu = train(db, str(tmp_path / "gpu"), cfg=cfg, device="cuda")
    assert np.isfinite(gpu["loss"]) and abs(gpu["loss"] - cpu["loss"]) < 0.02 * cpu["loss"], (gpu, cpu)
