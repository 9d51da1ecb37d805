"""Generation that retrieves every 64 tokens, from a local index or through the index service.

Each time the text reaches a chunk boundary, the chunk just completed is embedded with the frozen
BERT, its k nearest chunks are looked up, and their [N, F] tokens condition the tokens that follow
through CCA. Every generated chunk is returned with the neighbours that conditioned it.

``next_step`` is the loop's one rule (which chunks to retrieve before the next tokens, how many
tokens until the next chunk boundary, when to stop), shared by ``generate`` here and the service's
``/v1/generate``, which retrieves and extends through its deployments.

    python -m model.generate --db db --ckpt runs/default/retro/ckpt.pt --prompt "Python's list type" --tokens 128
    python -m index_service.client --url http://127.0.0.1:8000 --db db --ckpt ... --prompt ...  # `make serve`'s
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Container
from dataclasses import dataclass, field

import numpy as np
import torch

from model import checkpoint
from model.retrieval import LocalRetriever, Neighbours, Retriever
from retro_db import cli
from retro_db.tokenizer import EOS, db_tokenizer, special_id

log = logging.getLogger("model.generate")


@dataclass
class GeneratedChunk:
    text: str
    token_ids: list
    neighbour_chunk_ids: list = field(default_factory=list)  # retrieved by the chunk before this one
    neighbour_texts: list = field(default_factory=list)


def window_start(u: int, max_chunks: int) -> int:
    """The first chunk of the context a token of chunk ``u`` is predicted from: the last
    ``max_chunks`` whole chunks up to u, so that retrieval stays aligned with chunks."""
    return max(0, u + 1 - max_chunks)


def window_neighbours(retrieved: dict[int, np.ndarray], first: int, l: int, pad: int) -> torch.Tensor | None:
    """[N, F] rows of chunks first..first+l-1 as (1, l, k, 2m), all padding where none; None if none at all."""
    rows = [retrieved.get(first + u) for u in range(l)]
    present = [r for r in rows if r is not None]
    if not present:
        return None
    nb = np.full((l, *present[0].shape), pad, dtype=np.int64)
    for u, r in enumerate(rows):
        if r is not None:
            nb[u] = r
    return torch.from_numpy(nb)[None]


def sample(logits: torch.Tensor, *, temperature: float, top_k: int, seed: int, position: int) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature) over the top k.

    The draw's randomness is a function of (seed, position) alone: the same seed gives the same
    text however generation is split into calls (one process, or chunk by chunk through a service).
    """
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.double() / temperature
    if top_k:
        logits[logits < torch.topk(logits, min(top_k, logits.numel())).values[-1]] = -float("inf")
    probs = torch.softmax(logits, -1).numpy()
    return int(np.random.default_rng([seed, position]).choice(len(probs), p=probs / probs.sum()))


@torch.no_grad()
def extend(
    model,
    tokens: list[int],
    retrieved: dict[int, np.ndarray],
    n: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Up to ``n`` new tokens after ``tokens``, conditioned on the [N, F] rows ``retrieved[u]`` (k, 2m) of
    completed chunks u. Callers retrieve at chunk boundaries, so ``n`` never crosses one (the rows
    of the chunk that the new tokens complete are not known yet)."""
    cfg = model.config
    m, pad = cfg.chunk_size, cfg.pad_id
    if n > m - len(tokens) % m:  # the encoder's cache below holds only inside one chunk
        raise ValueError(
            f"{n} tokens after position {len(tokens)} cross a chunk boundary (every {m} tokens): retrieve there first"
        )
    model.eval()
    tokens, new = list(tokens), []
    device = next(model.parameters()).device
    # the window and its neighbours stay the same until the chunk boundary
    first = window_start(len(tokens) // m, cfg.max_chunks)
    window = tokens[first * m :]
    l = len(window) // m + 1
    neighbours = window_neighbours(retrieved, first, l, pad) if cfg.retrieval else None
    neighbours = None if neighbours is None else neighbours.to(device)
    cached = hasattr(model, "decode")  # a RETRO-fit: the frozen decoder's KV cache, one new token per forward
    encoder_cache, state = {}, {}
    for _ in range(n):
        if cached:
            idx = torch.tensor([tokens[-1:] if state else window])
            logits = model.decode(idx.to(device), neighbours, state)[0, -1]
        else:
            window = tokens[first * m :]
            idx = torch.full((1, l * m), pad, dtype=torch.long)
            idx[0, : len(window)] = torch.tensor(window)
            logits = model(idx.to(device), neighbours, encoder_cache=encoder_cache)[0][0, len(window) - 1]
        nxt = sample(logits.float().cpu(), temperature=temperature, top_k=top_k, seed=seed, position=len(tokens))
        tokens.append(nxt)
        new.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
    return new


@dataclass(frozen=True)
class Step:
    """One step of generation: retrieve for these chunks, then extend by this many tokens."""

    # completed chunks in the next token's context not retrieved yet (those before it condition nothing)
    retrieve: list[int]
    extend: int  # tokens to generate now: up to the next chunk boundary, where retrieval comes first


def next_step(
    tokens: list[int],
    prompt_tokens: int,
    end: int,
    retrieved: Container[int] | None,
    *,
    chunk_size: int,
    max_chunks: int,
    stop_id: int | None = None,
) -> Step | None:
    """The next step of generating up to ``end`` tokens after a prompt of ``prompt_tokens``, or None when
    done (``end`` reached, or ``stop_id`` generated). ``retrieved``: the chunks already retrieved, None
    with retrieval off."""
    n = len(tokens)
    if n >= end or (stop_id is not None and n > prompt_tokens and tokens[-1] == stop_id):
        return None
    u = n // chunk_size
    todo = [] if retrieved is None else [c for c in range(window_start(u, max_chunks), u) if c not in retrieved]
    return Step(todo, min(end - n, chunk_size - n % chunk_size))


def context_rows(
    hits: dict[int, Neighbours], n_tokens: int, *, chunk_size: int, max_chunks: int
) -> dict[int, np.ndarray]:
    """The [N, F] rows of the retrieved chunks in the context of the token after ``n_tokens`` (what
    ``extend`` reads)."""
    first = window_start(n_tokens // chunk_size, max_chunks)
    return {u: h.rows for u, h in hits.items() if u >= first}


def chunk_tokens(tokens: list[int], u: int, chunk_size: int) -> list[int]:
    return tokens[u * chunk_size : (u + 1) * chunk_size]


def generate(
    model,
    prompt_ids: list[int],
    retrieve: Retriever | None,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_id: int | None = None,
) -> tuple[list[int], list[Neighbours | None]]:
    """Greedy (temperature 0) or sampled continuation of ``prompt_ids``, retrieving with ``retrieve``
    (None: retrieval off). Returns all tokens and, per chunk of the sequence, the neighbours retrieved
    by the chunk before it (None for the first chunk, and for chunks of a long prompt whose
    predecessor never entered the context of a generated token).
    """
    cfg = model.config
    m, shape = cfg.chunk_size, {"chunk_size": cfg.chunk_size, "max_chunks": cfg.max_chunks}
    tokens, hits = list(prompt_ids), {}
    retrieved = hits if retrieve is not None and cfg.retrieval else None
    while (
        step := next_step(
            tokens, len(prompt_ids), len(prompt_ids) + max_new_tokens, retrieved, stop_id=stop_id, **shape
        )
    ) is not None:
        hits.update((u, retrieve(chunk_tokens(tokens, u, m))) for u in step.retrieve)
        tokens += extend(
            model,
            tokens,
            context_rows(hits, len(tokens), **shape),
            step.extend,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            stop_id=stop_id,
        )
    return tokens, [hits.get(u - 1) for u in range(-(-len(tokens) // m))]


def generate_text(
    db: str,
    ckpt: str,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    k: int = 2,
    temperature: float = 0.0,
    retriever: Callable[..., Retriever] = LocalRetriever,
) -> list[GeneratedChunk]:
    """Text in, chunks out: each with the neighbours (ids and [N, F] text) that conditioned it.

    Neighbours come from ``retriever(db, k=, align=)``: by default ``db``'s index in this process
    (``index_service.client.ServiceRetriever.for_url`` asks a service), lined up with their chunks
    as the model was trained (``align_neighbours``).
    """
    model, _ = checkpoint.load(ckpt)
    tokenizer = db_tokenizer(db)
    retrieve = retriever(db, k=k, align=model.config.align_neighbours)
    tokens, per_chunk = generate(
        model,
        tokenizer.encode(prompt).ids,
        retrieve,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop_id=special_id(tokenizer, EOS),
    )
    m = model.config.chunk_size
    out = []
    for u, hit in enumerate(per_chunk):
        chunk = chunk_tokens(tokens, u, m)
        ids, rows = (hit.ids, hit.rows) if hit is not None else (np.zeros(0, np.int64), np.zeros((0, 2 * m), np.int64))
        texts = [
            tokenizer.decode([int(t) for t in row if t != model.config.pad_id]) for i, row in zip(ids, rows) if i >= 0
        ]
        out.append(GeneratedChunk(tokenizer.decode(chunk), chunk, [int(i) for i in ids if i >= 0], texts))
    return out


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db")
    parser.add_argument("--ckpt", default="runs/default/retro/ckpt.pt")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0)
    return parser


def print_generation(args: argparse.Namespace, retriever: Callable[..., Retriever] = LocalRetriever) -> None:
    chunks = generate_text(
        args.db,
        args.ckpt,
        args.prompt,
        max_new_tokens=args.tokens,
        k=args.k,
        temperature=args.temperature,
        retriever=retriever,
    )
    for u, chunk in enumerate(chunks):
        print(f"--- chunk {u}: {chunk.text!r}")
        for cid, text in zip(chunk.neighbour_chunk_ids, chunk.neighbour_texts):
            print(f"    neighbour {cid}: {text[:120]!r}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print_generation(build_parser().parse_args())


if __name__ == "__main__":
    cli.run(main, "model.generate")
