"""One short GPU check: CUDA embedding throughput, faiss index training and search, bf16 RETRO training steps.

Runs on a lent GPU machine whose image has torch, transformers and sentence-transformers but not
this project's other dependencies and no network. It takes a folder (``--assets``) prepared on the
CPU machine by ``python -m bench.gpu_check --prepare DIR --db db``: the packaged MiniLM's config
and tokenizer files (its 90 MB of weights exceed what travels, so the GPU side initialises the same
architecture randomly: throughput does not depend on weight values) and real chunk texts decoded
from the DB, and the DB's stored train embeddings for the index check (which needs faiss's GPU
build and pyarrow on the GPU machine; without them it says so and the rest still runs).

    python -m bench.gpu_check --prepare .gpu --db db      # CPU machine
    python3 -m bench.gpu_check --assets .gpu              # GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np


def prepare(out: str, db: str, n: int = 8192) -> None:
    import pyarrow.parquet as pq

    from retro_db import layout
    from retro_db.embedder import resolve_model
    from retro_db.tokenizer import db_tokenizer

    os.makedirs(os.path.join(out, "minilm"), exist_ok=True)
    src = resolve_model("default")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, name), os.path.join(out, "minilm", name))
    tokenizer = db_tokenizer(db)
    chunks = [t for f in layout.chunk_shard_files(db, "train") for t in pq.read_table(f)["tokens"].to_pylist()]
    with open(os.path.join(out, "chunks.json"), "w") as f:
        json.dump(tokenizer.decode_batch(chunks[:n]), f)
    from retro_db.search import load_embedding_rows

    np.save(os.path.join(out, "vectors.npy"), np.concatenate(load_embedding_rows(db, "train").arrays))  # fp16 (n, d)


def index_check(assets: str, copies: int = 32, factory: str = "IVF1024,PQ48x8np", nprobe: int = 16) -> list[str]:
    """k-means + PQ training on the GPU against the CPU (same code path, ``train_index``), recall@10
    of both against exact search, and IVF-PQ search queries/s on the GPU against the CPU. The DB's
    vectors are tiled ``copies`` times with small noise so that training has lists to fill."""
    try:
        import faiss

        from pipeline.index_build import train_index
        from pipeline.index_recall import recall_at_k
        from retro_db.search import faiss_gpus
    except ImportError as e:
        return [f"index: skipped ({e}); the GPU machine needs faiss-gpu and pyarrow"]
    if not faiss_gpus():
        return [f"index: skipped: faiss {faiss.__version__} sees no GPU (install the faiss-gpu build)"]
    rng = np.random.default_rng(0)
    base = np.load(os.path.join(assets, "vectors.npy")).astype(np.float32)
    x = np.concatenate([base + rng.normal(0, 0.01, base.shape).astype(np.float32) for _ in range(copies)])
    queries, data = x[:1000], x[1000:]
    exact = faiss.IndexFlatL2(x.shape[1])
    exact.add(data)
    t0 = time.perf_counter()
    _, truth = exact.search(queries, 10)
    exact_qps = len(queries) / (time.perf_counter() - t0)
    lines, trained = [], {}
    for device in ("cpu", "gpu"):
        index = faiss.index_factory(x.shape[1], factory)
        t0 = time.perf_counter()
        train_index(index, data[: 256 * 1024], device)
        seconds = time.perf_counter() - t0
        index.add(data)
        faiss.extract_index_ivf(index).nprobe = nprobe
        _, found = index.search(queries, 10)
        trained[device] = index
        lines.append(
            f"index {factory} on {len(data):,} vectors: trained on {device} in {seconds:.1f} s; "
            f"recall@10 (PQ, nprobe {nprobe}) "
            f"{recall_at_k(found, truth):.3f}"
        )
    res = faiss.StandardGpuResources()
    on_gpu = faiss.index_cpu_to_gpu(res, 0, trained["gpu"])
    faiss.GpuParameterSpace().set_index_parameter(on_gpu, "nprobe", nprobe)
    for name, index in (("cpu", trained["gpu"]), ("gpu", on_gpu)):
        index.search(queries, 40)
        t0 = time.perf_counter()
        _, found = index.search(queries, 40)
        qps = len(queries) / (time.perf_counter() - t0)
        lines.append(
            f"search on {name}: {qps:,.0f} queries/s for 40 candidates (exact CPU flat search: {exact_qps:,.0f} q/s); "
            f"recall@10 of the top 10 {recall_at_k(found[:, :10], truth):.3f}"
        )
    return lines


def embed_check(assets: str, arch: str = "minilm", batches=(128, 512)) -> list[str]:
    """``arch``: the packaged MiniLM's architecture, or ``bert-base`` (12 layers, 768-d, the paper's
    BERT; same uncased wordpiece vocabulary, so the MiniLM tokenizer files serve)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    from retro_db.embedder import ChunkEmbedder

    texts = json.load(open(os.path.join(assets, "chunks.json")))
    model_dir = os.path.join(assets, f"{arch}-random")
    torch.manual_seed(0)
    config = BertConfig.from_pretrained(os.path.join(assets, "minilm")) if arch == "minilm" else BertConfig()
    BertModel(config).save_pretrained(model_dir)
    for name in os.listdir(os.path.join(assets, "minilm")):
        if name != "config.json":
            shutil.copy(os.path.join(assets, "minilm", name), model_dir)
    lines = []
    for batch in batches:
        st = SentenceTransformer(model_dir, device="cuda")
        st.encode(texts, batch_size=batch)  # warm-up over every shape that the timed pass sees
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        st.encode(texts, batch_size=batch)
        torch.cuda.synchronize()
        st_rate = len(texts) / (time.perf_counter() - t0)
        ours = ChunkEmbedder(model_dir, device="cuda", batch_size=batch)
        ours.embed_texts(texts)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ours.embed_texts(texts)
        torch.cuda.synchronize()
        rate = len(texts) / (time.perf_counter() - t0)
        lines.append(
            f"embed {arch} {len(texts)} chunks, batch {batch}: sentence-transformers fp32 {st_rate:,.0f} chunks/s; "
            f"ChunkEmbedder bf16 autocast {rate:,.0f} chunks/s ({rate / st_rate:.2f}x)"
        )
    return lines


def train_check() -> list[str]:
    import torch

    from model.model import Retro, paper_172m_config, tiny_config

    lines = []
    for name, cfg, batch in (
        ("tiny", tiny_config(vocab_size=8192), 32),
        ("paper-172m", paper_172m_config(vocab_size=32000, max_chunks=16), 8),
    ):
        for retrieval in (True, False):
            torch.manual_seed(0)
            cfg.retrieval = retrieval
            model = Retro(cfg).cuda()
            opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
            t = cfg.max_chunks * cfg.chunk_size
            x = torch.randint(2, cfg.vocab_size, (batch, t), device="cuda")
            y = torch.roll(x, -1, 1)
            nb = (
                torch.randint(2, cfg.vocab_size, (batch, cfg.max_chunks, 2, 2 * cfg.chunk_size), device="cuda")
                if retrieval
                else None
            )
            losses = []

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss, _ = model(x, nb, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            steps, t0 = 10, time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            rate = batch * t * steps / (time.perf_counter() - t0)
            lines.append(
                f"train {name} {'RETRO' if retrieval else 'baseline'} ({model.num_params() / 1e6:.0f}M params, "
                f"batch {batch} x {t} tokens, "
                f"k=2): {rate:,.0f} tokens/s bf16; loss {losses[0]:.3f} -> {losses[-1]:.3f} on a fixed batch; "
                f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            )
            model = opt = None  # free GPU memory before the next configuration
            torch.cuda.empty_cache()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare")
    parser.add_argument("--db", default="db")
    parser.add_argument("--assets", default=".gpu")
    parser.add_argument("--embed-only", action="store_true")
    parser.add_argument("--index-only", action="store_true", help="only the faiss training and search check")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="only the embedding rates docs/SCALING.md uses (MiniLM and BERT-base, batch 512)",
    )
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare, args.db)
        return
    import torch

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.scaling:
        for arch in ("minilm", "bert-base"):
            for line in embed_check(args.assets, arch, batches=(512,)):
                print(line, flush=True)
        return
    if args.index_only:
        for line in index_check(args.assets):
            print(line, flush=True)
        return
    for line in embed_check(args.assets) + ([] if args.embed_only else index_check(args.assets) + train_check()):
        print(line, flush=True)


if __name__ == "__main__":
    main()
