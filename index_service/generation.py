"""The trained RETRO model as a deployment beside the index: it extends token sequences and scores them.

It holds no retrieval of its own: the ingress retrieves at each chunk boundary through the same
batched path as ``/v1/search`` and passes the [N, F] rows in, so generation and search share the
index, its deletions and its increments. Calls are stateless (any replica can take the next
chunk), and sampling depends only on (seed, position), so the same seed gives the same text.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ray import serve

from model.explain import token_logprobs
from model.generate import extend
from model.train import load_model

log = logging.getLogger("index_service")

CHECKPOINT = "ckpt.pt"


def resolve_checkpoint(run: str) -> str:
    """A checkpoint file, or the run directory of ``make train`` (RUN/retro/ckpt.pt, else RUN/ckpt.pt)."""
    for path in (run, os.path.join(run, "retro", CHECKPOINT), os.path.join(run, CHECKPOINT)):
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise FileNotFoundError(f"no checkpoint at {run} (nor {run}/retro/{CHECKPOINT}, {run}/{CHECKPOINT}); "
                            f"train one first: make train DB=<db> RUN={run}")


def checkpoint_summary(path: str) -> dict:
    """What the ingress and the page need to know of a checkpoint, read without building the model."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # the configs only: weights and optimizer stay on disk
    config, train = ckpt["model_config"], ckpt.get("train_config", {})
    return {"checkpoint": path, "step": ckpt.get("step"), "retrieval": config["retrieval"], "chunk_size": config["chunk_size"],
            "max_chunks": config["max_chunks"], "vocab_size": config["vocab_size"], "k": train.get("k", 2),
            "n_layer": config["n_layer"], "n_embd": config["n_embd"], "align_neighbours": config.get("align_neighbours", False)}


def check_fits_db(summary: dict, *, chunk_size: int, vocab_size: int) -> None:
    """A model trained on another DB's tokenizer or chunk size would read its neighbours as noise."""
    if summary["chunk_size"] != chunk_size or summary["vocab_size"] != vocab_size:
        raise ValueError(f"{summary['checkpoint']} was trained for chunks of {summary['chunk_size']} tokens and a vocabulary of "
                         f"{summary['vocab_size']}; this DB has {chunk_size} and {vocab_size}: serve it with the DB it was trained on")


@serve.deployment(max_ongoing_requests=32)
class LanguageModel:
    """One checkpoint on the replica's device (CUDA when the replica has a GPU). One worker thread
    runs the forward passes, so torch's threads never compete with each other."""

    def __init__(self, checkpoint: str, *, threads: int = 1):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, _ = load_model(checkpoint)
        self.model.to(device).eval()
        # torch's thread count is set where the forward passes run (a fractional-CPU actor starts at 1)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="retro", initializer=torch.set_num_threads, initargs=(threads,))
        log.info("language model %s on %s: %.1fM parameters, %d torch threads", checkpoint, device, self.model.num_params() / 1e6, threads)

    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.worker, lambda: fn(*args, **kwargs))

    async def extend(self, tokens: list[int], retrieved: dict[int, np.ndarray], n: int, *, temperature: float, top_k: int,
                     seed: int, stop_id: int | None) -> list[int]:
        """Up to ``n`` tokens after ``tokens`` (never across a chunk boundary; ``model.generate.extend``)."""
        return await self._run(extend, self.model, tokens, retrieved, n, temperature=temperature, top_k=top_k, seed=seed, stop_id=stop_id)

    async def score(self, tokens: list[int], retrieved: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Every token's log-probability with and without retrieval (``model.explain.token_logprobs``)."""
        return await self._run(token_logprobs, self.model, tokens, retrieved)
