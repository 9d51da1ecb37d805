"""Stage 2 (Ray): every chunk embedded by the frozen BERT of ``retro_db.embedder``.

Output per chunk shard: ``DB/embeddings/<split>/shard-*.npy``, (n, d) fp16,
row i = chunk ``first_chunk_id + i`` of the matching chunk shard.

Work is cut into blocks of ``block_rows`` chunks; an actor pool (one GPU per actor when GPUs
exist, fractional CPUs and one intra-op thread per actor otherwise) embeds blocks and writes each
one atomically, so a killed job redoes only missing blocks, and a shard is assembled once all of
its blocks exist. Blocks hold chunks of similar length (less padding) and are cut the same way on
every run, so reruns give the same bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.actor_pool import ReportsNode, cluster_cpus_gpus, node_cpus, spread_actor_pool
from pipeline.stage import Stage, completed
from pipeline.token_shards import write_token_shard
from retro_db import layout
from retro_db import manifest as mf
from retro_db.embedder import DEFAULT_MODEL, ChunkEmbedder, model_fingerprint
from retro_db.ray_cluster import connect_ray
from retro_db.storage import sha256_file
from retro_db.token_store import read_chunk_shard
from retro_db.tokenizer import PAD, load_lm_tokenizer, special_id

log = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "frozen BERT: an HF path or name (default: the packaged all-MiniLM-L6-v2)"},
    )
    max_length: int = 256  # wordpieces; a 64-token chunk rarely needs more than ~150
    batch_size: int = 128
    precision: str = field(
        default="fp32",
        metadata={
            "help": "CPU embedding precision: int8 quantises Linear layers dynamically (GPUs use bf16 autocast)",
            "choices": ("fp32", "int8"),
        },
    )
    block_rows: int = field(
        default=4096, metadata={"help": "chunks per resumable work unit, length-sorted within a shard"}
    )


class EmbedActor(ReportsNode):
    """Ray actor: embeds blocks of chunk shards and writes each block file atomically."""

    def __init__(self, config: dict, lm_tokenizer_json: str, threads: int):
        os.environ["OMP_NUM_THREADS"] = str(threads)
        cfg = EmbedConfig(**config)
        self.embedder = ChunkEmbedder(
            cfg.model,
            lm_tokenizer_json=lm_tokenizer_json,
            precision=cfg.precision,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            threads=threads,
        )
        self._shard_path, self._tokens = None, None

    def embed_block(self, chunk_file: str, rows: np.ndarray, out_path: str) -> tuple[str, int, float]:
        """Embeds the given rows of a chunk shard; writes (rows, fp16 vectors) to ``out_path``."""
        t0 = time.perf_counter()
        if self._shard_path != chunk_file:
            self._tokens = read_chunk_shard(chunk_file, columns=("tokens",))["tokens"].to_pylist()
            self._shard_path = chunk_file
        vectors = self.embedder.embed_token_chunks([self._tokens[r] for r in rows]).astype(np.float16)
        tmp = out_path + ".tmp.npz"
        np.savez(tmp, rows=rows, vectors=vectors)
        os.replace(tmp, out_path)
        return out_path, len(rows), time.perf_counter() - t0


def embedding_path(chunk_file: str) -> str:
    return layout.aligned_path(chunk_file, layout.EMBEDDINGS)


def length_sorted_blocks(chunk_file: str, block_rows: int) -> list[np.ndarray]:
    """Row indices of a shard cut into blocks of similar text length.

    Padding waste dominates CPU embedding time when lengths vary (code next to prose): sorting a
    whole shard by byte length before cutting blocks, then by wordpiece count inside each batch,
    embeds faster than sorting each contiguous block alone (docs/BENCHMARKS.md, Stage 2).
    """
    n_bytes = pq.read_table(chunk_file, columns=["n_bytes"])["n_bytes"].to_numpy()
    order = np.argsort(n_bytes, kind="stable")
    return [order[s : s + block_rows] for s in range(0, len(order), block_rows)]


def _assemble_shard(chunk_file: str, blocks: list[str], rows: int) -> str:
    out = embedding_path(chunk_file)
    vectors = None
    for block in blocks:
        with np.load(block) as data:
            if vectors is None:
                vectors = np.zeros((rows, data["vectors"].shape[1]), dtype=np.float16)
            vectors[data["rows"]] = data["vectors"]
    tmp = out + ".tmp.npy"
    np.save(tmp, vectors if vectors is not None else np.zeros((0, 0), np.float16))
    os.replace(tmp, out)
    shutil.rmtree(out + ".blocks", ignore_errors=True)
    return out


def actor_layout(
    node_cpus: list[float], gpus: float, *, actors: int = 0, max_threads: int = 8
) -> tuple[int, int, dict]:
    """(actors, intra-op threads per actor, Ray resources per actor) for nodes with ``node_cpus`` free.

    GPUs: one actor per GPU. CPUs: actors of up to ``max_threads`` threads, no more than the
    smallest node holds, so every actor fits on a node (N nodes of C CPUs: N actors of C threads);
    on a small machine one actor of all its threads embeds faster than one actor per core
    (docs/BENCHMARKS.md, Stage 2). Each actor reserves one CPU less than it uses (at least half a CPU), so
    Ray's own tasks always find a CPU and a small machine cannot deadlock.
    """
    if gpus:
        return actors or int(gpus), 1, {"num_gpus": 1}
    nodes = [int(c) for c in node_cpus if c >= 1] or [1]
    threads = max(1, min(max_threads, min(nodes), sum(nodes) // actors if actors else max_threads))
    n = actors or max(1, sum(c // threads for c in nodes))
    return n, threads, {"num_cpus": max(0.5, threads - 1.0)}


def write_embeddings(db: str, *, config: EmbedConfig | None = None, actors: int = 0, overwrite: bool = False) -> dict:
    """Runs stage 2 over every chunk shard of ``db``; returns its manifest record."""
    config = config or EmbedConfig()
    chunks = completed(db, "chunks")
    stage = Stage(
        db,
        "embeddings",
        config,
        overwrite=overwrite,
        fingerprints={
            "model_sha256": model_fingerprint(config.model),
            "chunks_tokenizer_sha256": chunks["tokenizer_sha256"],
            "chunk_size": chunks["config"]["chunk_size"],
        },
    )
    files = layout.chunk_shard_files(db)
    if not files:
        raise ValueError(f"{db}: no chunk shards to embed (the corpus produced no chunks)")
    tokenizer_path = layout.tokenizer_path(db)
    if sha256_file(tokenizer_path) != chunks["tokenizer_sha256"]:
        raise ValueError(f"{tokenizer_path} is not the tokenizer the chunks were built with (sha256 differs)")
    if done := stage.finished([embedding_path(f) for f in files]):
        return done
    stage.start(wipe=[os.path.join(db, layout.EMBEDDINGS), os.path.join(db, layout.TOKENS)])

    lm_json = open(tokenizer_path).read()
    pad_id = special_id(load_lm_tokenizer(lm_json), PAD)
    for f in files:
        write_token_shard(f, chunk_size=stage.record["chunk_size"], pad_id=pad_id)

    rows = {f: pq.ParquetFile(f).metadata.num_rows for f in files}
    todo, blocks_of = [], {}
    for f in files:
        if os.path.exists(embedding_path(f)):
            continue
        block_dir = embedding_path(f) + ".blocks"
        os.makedirs(block_dir, exist_ok=True)
        blocks = length_sorted_blocks(f, config.block_rows)
        blocks_of[f] = [os.path.join(block_dir, f"block-{i:06d}.npz") for i in range(len(blocks))]
        # longest blocks first, so the job does not end on one actor busy with the longest block
        todo += [(f, b, path) for b, path in reversed(list(zip(blocks, blocks_of[f]))) if not os.path.exists(path)]
    connect_ray()
    n_actors, threads, resources = actor_layout(node_cpus(), cluster_cpus_gpus()[1], actors=actors)
    n_actors = max(1, min(n_actors, len(todo)))
    log.info(
        "embeddings: %d blocks to embed (%d chunks) on %d actors (%s)",
        len(todo),
        sum(len(t[1]) for t in todo),
        n_actors,
        "1 GPU each" if "num_gpus" in resources else f"{threads} CPU thread(s) each",
    )
    t0, done_chunks, nodes = time.perf_counter(), 0, 0
    if todo:
        pool, nodes = spread_actor_pool(EmbedActor, n_actors, resources, asdict(config), lm_json, threads)
        # Blocks are ordered by shard so each actor mostly rereads no shard.
        results = pool.map_unordered(lambda a, t: a.embed_block.remote(*t), todo)
        with tqdm(total=sum(len(t[1]) for t in todo), unit="chunk", desc="embed", mininterval=2) as bar:
            for _, n, _ in results:
                bar.update(n)
                done_chunks += n
    seconds = time.perf_counter() - t0
    shards = []
    for f in files:
        out = embedding_path(f)
        if not os.path.exists(out):
            _assemble_shard(f, blocks_of[f], rows[f])
        array = np.load(out, mmap_mode="r")
        if len(array) != rows[f]:
            raise ValueError(f"{out}: {len(array)} rows for {rows[f]} chunks in {f}; delete it and rerun")
        shards.append(stage.shard(out, rows=rows[f]))
    dim = int(np.load(embedding_path(files[0]), mmap_mode="r").shape[1])
    return stage.complete(
        shards=shards,
        dim=dim,
        counts={
            "chunks": sum(rows.values()),
            "embedded_this_run": done_chunks,
            "ray_nodes_this_run": nodes,
            "chunks_per_s_this_run": round(done_chunks / seconds, 1) if done_chunks else None,
        },
        versions=mf.package_versions("torch", "transformers", "ray", "numpy"),
    )
