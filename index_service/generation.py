"""The trained RETRO model as a deployment beside the index (``LanguageModel``: it extends token
sequences and scores them), and ``ServedModel``, the ingress's side of generation and explanation.

The model holds no retrieval of its own: the ingress retrieves at each chunk boundary through the
same batched path as ``/v1/search`` and passes the [N, F] rows in, so generation and search share
the index, its deletions and its increments. Which chunks to retrieve and how far to extend is
``model.generate.next_step``, as in one process. Calls are stateless (any replica can take the next
chunk), and sampling depends only on (seed, position), so the same seed gives the same text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ray import serve

from index_service import api
from index_service.deployments import remote
from model import checkpoint
from model.explain import conditioning_chunks, token_logprobs
from model.generate import context_rows, extend, next_step
from model.retrieval import Neighbours

# (tokens, chunks of them to retrieve for, k) -> each chunk's neighbours
RetrieveChunks = Callable[[list[int], list[int], int], Awaitable[dict[int, Neighbours]]]

log = logging.getLogger("index_service")


@serve.deployment(max_ongoing_requests=32)
class LanguageModel:
    """One checkpoint on the replica's device (CUDA when the replica has a GPU). One worker thread
    runs the forward passes, so torch's threads never compete with each other."""

    def __init__(self, path: str, *, threads: int = 1):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, _ = checkpoint.load(path)
        self.model.to(device).eval()
        # torch's thread count is set where the forward passes run (a fractional-CPU actor starts at 1)
        self.worker = ThreadPoolExecutor(
            1, thread_name_prefix="retro", initializer=torch.set_num_threads, initargs=(threads,)
        )
        log.info(
            "language model %s on %s: %.1fM parameters, %d torch threads",
            path,
            device,
            self.model.num_params() / 1e6,
            threads,
        )

    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.worker, lambda: fn(*args, **kwargs))

    async def extend(
        self,
        tokens: list[int],
        retrieved: dict[int, np.ndarray],
        n: int,
        *,
        temperature: float,
        top_k: int,
        seed: int,
        stop_id: int | None,
    ) -> list[int]:
        """Up to ``n`` tokens after ``tokens`` (never across a chunk boundary; ``model.generate.extend``)."""
        return await self._run(
            extend, self.model, tokens, retrieved, n, temperature=temperature, top_k=top_k, seed=seed, stop_id=stop_id
        )

    async def score(self, tokens: list[int], retrieved: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Every token's log-probability with and without retrieval (``model.explain.token_logprobs``)."""
        return await self._run(token_logprobs, self.model, tokens, retrieved)


class ServedModel:
    """Generation and explanation as the ingress runs them: retrieval through ``retrieve`` (the
    ingress's batches), forward passes on the ``LanguageModel`` deployment (``handle``)."""

    def __init__(self, handle, info: dict, retrieve: RetrieveChunks, stop_id: int):
        self.handle, self.info, self.retrieve, self.stop_id = handle, info, retrieve, stop_id
        self.shape = {"chunk_size": info["chunk_size"], "max_chunks": info["max_chunks"]}

    async def _call(self, method: str, *args, **kwargs):
        return await remote("model", getattr(self.handle, method).remote(*args, **kwargs))

    async def generate(self, prompt: list[int], request: api.GenerateRequest):
        """(tokens, neighbours per retrieving chunk, scores with and without retrieval or None) of a generation."""
        k, tokens, hits, end = request.k or self.info["k"], list(prompt), {}, len(prompt) + request.max_new_tokens
        retrieved = hits if request.retrieval and self.info["retrieval"] else None
        sampling = {"temperature": request.temperature, "top_k": request.top_k, "seed": request.seed}
        while step := next_step(tokens, len(prompt), end, retrieved, stop_id=self.stop_id, **self.shape):
            hits.update(await self.retrieve(tokens, step.retrieve, k))
            rows = context_rows(hits, len(tokens), **self.shape)
            tokens += await self._call("extend", tokens, rows, step.extend, stop_id=self.stop_id, **sampling)
        if not request.explain:
            return tokens, hits, None
        if retrieved is not None:  # every chunk's neighbours, as /v1/explain of this text would score it
            todo = [u for u in conditioning_chunks(len(tokens), self.info["chunk_size"]) if u not in hits]
            hits.update(await self.retrieve(tokens, todo, k))
        return tokens, hits, await self._call("score", tokens, {u: h.rows for u, h in hits.items()})

    async def explain(self, tokens: list[int], k: int | None):
        """(neighbours per retrieving chunk, scores with and without retrieval) of a text."""
        todo = conditioning_chunks(len(tokens), self.info["chunk_size"]) if self.info["retrieval"] else []
        hits = await self.retrieve(tokens, todo, k or self.info["k"])
        return hits, await self._call("score", tokens, {u: h.rows for u, h in hits.items()})
