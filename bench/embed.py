"""Benchmark of stage 2: the project's embedder against sentence-transformers on the same chunks.

Same model (the packaged all-MiniLM-L6-v2 unless --model), same batch size, same cores:
- baseline: ``SentenceTransformer.encode`` with torch on all cores;
- ours, in process: ``ChunkEmbedder`` (length-sorted batches, no pooler, inference mode);
- ours, the stage as it runs: a Ray actor pool (on CPU one actor per node on all its cores:
  measured faster than one single-threaded actor per core), length-sorted blocks;
- ours, int8: dynamic int8 Linear layers (CPU), reported with the recall it keeps.

The embeddings are checked to be ST's (up to ST's final L2 normalisation). Recall@10 of a path = overlap of
each chunk's 10 exact nearest chunks (squared L2 among the benchmark chunks) under that path's embeddings
with those under the fp32 path's.

    python -m bench.embed [--chunks 1024]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from bench.chunk_pipeline import load_texts
from pipeline.__main__ import DEFAULT_CORPUS
from pipeline.embed import EmbedConfig, actor_layout
from pipeline.lm_tokenizer import train_lm_tokenizer
from retro_db.embedder import ChunkEmbedder, resolve_model
from retro_db.ray_cluster import connect_ray

log = logging.getLogger("bench.embed")


def chunk_texts(n: int, chunk_size: int = 64) -> list[str]:
    """n real 64-token chunks of the default corpus, decoded back to text as the stage does."""
    texts = load_texts(DEFAULT_CORPUS)
    tokenizer = train_lm_tokenizer(texts[:400], vocab_size=8192)
    chunks = []
    for enc in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
        chunks += [enc.ids[i : i + chunk_size] for i in range(0, len(enc.ids), chunk_size)]
    step = max(1, len(chunks) // n)
    return tokenizer.decode_batch(chunks[::step][:n])


def exact_knn(x: np.ndarray, k: int = 10) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2 * x @ x.T + (x * x).sum(1)[None, :]
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1)[:, :k]


def knn_recall(x: np.ndarray, reference: np.ndarray, k: int = 10) -> float:
    a, b = exact_knn(x, k), exact_knn(reference, k)
    return float(np.mean([len(np.intersect1d(p, q)) / k for p, q in zip(a, b)]))


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def ray_pool_embed(texts: list[str], model: str, batch_size: int, cores: int) -> tuple[np.ndarray, float]:
    """The stage's layout: one actor per node using all of its cores, length-sorted blocks."""

    ray = connect_ray()
    n_actors, threads, resources = actor_layout([cores], 0)

    @ray.remote(**resources)
    class Embedder:
        def __init__(self):
            self.e = ChunkEmbedder(model, batch_size=batch_size, threads=threads)

        def embed(self, texts):
            return self.e.embed_texts(texts)

    actors = [Embedder.remote() for _ in range(n_actors)]
    ray.get([a.embed.remote(texts[:16]) for a in actors])  # load + warm up, not timed
    # as the stage does: sort by byte length, cut blocks, longest first
    order = np.argsort([len(t.encode()) for t in texts], kind="stable")
    rows = EmbedConfig().block_rows
    blocks = [order[s : s + rows] for s in range(0, len(order), rows)][::-1]
    t0 = time.perf_counter()
    pool = ray.util.ActorPool(actors)
    parts = list(pool.map(lambda a, idx: a.embed.remote([texts[i] for i in idx]), blocks))
    seconds = time.perf_counter() - t0
    ray.shutdown()
    out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
    for idx, part in zip(blocks, parts):
        out[idx] = part
    return out, seconds


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    cores = os.cpu_count() if args.device == "cpu" else 1
    torch.set_num_threads(cores)
    texts = chunk_texts(args.chunks)
    rows = []
    st = SentenceTransformer(resolve_model(args.model), device=args.device)
    st.encode(texts[:32], batch_size=args.batch_size)
    st_vecs, st_s = timed(lambda: st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True))
    rows.append(("sentence-transformers encode (baseline)", st_s, None))

    ours = ChunkEmbedder(
        args.model, batch_size=args.batch_size, threads=cores if args.device == "cpu" else None, device=args.device
    )
    ours.embed_texts(texts[:32])
    fp32, ours_s = timed(ours.embed_texts, texts)
    # all-MiniLM-L6-v2's sentence-transformers pipeline ends in an L2 Normalize module; RETRO keys
    # are the plain mean, so compare with ST after normalising ours.
    unit = fp32 / np.linalg.norm(fp32, axis=1, keepdims=True)
    print(
        f"max |normalised ours - ST| = {np.abs(unit - st_vecs).max():.2e}; "
        f"recall@10 of normalised ours vs ST = {knn_recall(unit, st_vecs):.3f}"
    )
    rows.append((f"ChunkEmbedder in process ({'bf16 autocast' if args.device == 'cuda' else 'fp32'})", ours_s, None))
    if args.device == "cpu":
        pool_vecs, pool_s = ray_pool_embed(texts, args.model, args.batch_size, cores)
        rows.append(("Ray actor pool as the stage runs it (fp32)", pool_s, knn_recall(pool_vecs, fp32)))
        int8 = ChunkEmbedder(args.model, batch_size=args.batch_size, threads=cores, precision="int8")
        int8.embed_texts(texts[:32])
        q, q_s = timed(int8.embed_texts, texts)
        rows.append(("ChunkEmbedder int8 dynamic, in process", q_s, knn_recall(q, fp32)))

    print(
        f"{len(texts)} chunks, batch {args.batch_size}, device {args.device}, "
        f"{cores} core(s), torch {torch.__version__}"
    )
    print(f"{'path':45s} {'chunks/s':>10s} {'x baseline':>11s} {'recall@10 vs fp32':>18s}")
    for name, seconds, recall in rows:
        rate = len(texts) / seconds
        print(
            f"{name:45s} {rate:10.1f} {rate / (len(texts) / st_s):11.2f} "
            f"{'' if recall is None else f'{recall:.3f}':>18s}"
        )


if __name__ == "__main__":
    main()
