"""Generation that retrieves every 64 tokens, from a local index or through the index service.

Each time the text reaches a chunk boundary, the chunk just completed is embedded with the frozen
BERT, its k nearest chunks are looked up, and their [N, F] tokens condition the tokens that follow
through CCA. Every generated chunk is returned with the neighbours that conditioned it.

    python -m model.generate --db db --ckpt runs/default/retro/ckpt.pt --prompt "Python's list type" --tokens 128
    python -m model.generate ... --service http://127.0.0.1:8000     # neighbours from `make serve`
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from model.retrieval import LocalRetriever, Retriever, ServiceRetriever
from model.train import load_model
from retro_db import cli
from retro_db.tokenizer import EOS, db_tokenizer, special_id

log = logging.getLogger("model.generate")


@dataclass
class GeneratedChunk:
    text: str
    token_ids: list
    neighbour_chunk_ids: list = field(default_factory=list)  # retrieved by the chunk before this one
    neighbour_texts: list = field(default_factory=list)


@torch.no_grad()
def generate(model, prompt_ids: list[int], retrieve: Retriever, *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, stop_id: int | None = None) -> tuple[list[int], list[list]]:
    """Greedy (temperature 0) or sampled continuation of ``prompt_ids``.

    ``retrieve(chunk tokens) -> (ids (k,), tokens (k, 2m))``. Returns all tokens and, per chunk of
    the sequence, the (ids, [N, F] tokens) retrieved for it (None for the first chunk, which has none).
    The context is the last ``max_chunks`` whole chunks, so retrieval stays aligned with chunks.
    """
    cfg = model.config
    m, pad = cfg.chunk_size, cfg.pad_id
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = list(prompt_ids)
    retrieved: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(max_new_tokens):
        n_done = len(tokens) // m
        for u in range(n_done):  # retrieve once per completed chunk
            if u not in retrieved and cfg.retrieval:
                retrieved[u] = retrieve(tokens[u * m : (u + 1) * m])
        first = max(0, n_done + 1 - cfg.max_chunks)  # chunk window that holds the next position
        window = tokens[first * m :]
        l = len(window) // m + 1
        idx = torch.full((1, l * m), pad, dtype=torch.long)
        idx[0, : len(window)] = torch.tensor(window)
        neighbours = None
        if cfg.retrieval and retrieved:
            k = next(iter(retrieved.values()))[1].shape[0]
            nb = np.full((l, k, 2 * m), pad, dtype=np.int64)
            for u in range(l):
                if first + u in retrieved:
                    nb[u] = retrieved[first + u][1]
            neighbours = torch.from_numpy(nb)[None]
        logits, _, _ = model(idx, neighbours)
        logits = logits[0, len(window) - 1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                logits[logits < torch.topk(logits, top_k).values[-1]] = -float("inf")
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        tokens.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
    per_chunk = [retrieved.get(u - 1) for u in range(-(-len(tokens) // m))]
    return tokens, per_chunk


def generate_text(db: str, ckpt: str, prompt: str, *, max_new_tokens: int = 128, k: int = 2, temperature: float = 0.0,
                  retriever: Retriever | None = None) -> list[GeneratedChunk]:
    """Text in, chunks out: each with the neighbours (ids and [N, F] text) that conditioned it.

    ``retriever``: a ``LocalRetriever`` over ``db`` by default, or a ``ServiceRetriever``.
    """
    model, _ = load_model(ckpt)
    tokenizer = db_tokenizer(db)
    retriever = retriever or LocalRetriever(db, k=k)
    tokens, per_chunk = generate(model, tokenizer.encode(prompt).ids, retriever, max_new_tokens=max_new_tokens,
                                 temperature=temperature, stop_id=special_id(tokenizer, EOS))
    m = model.config.chunk_size
    out = []
    for u, hit in enumerate(per_chunk):
        chunk = tokens[u * m : (u + 1) * m]
        ids, rows = hit if hit is not None else (np.zeros(0, np.int64), np.zeros((0, 2 * m), np.int64))
        texts = [tokenizer.decode([int(t) for t in row if t != model.config.pad_id]) for i, row in zip(ids, rows) if i >= 0]
        out.append(GeneratedChunk(tokenizer.decode(chunk), chunk, [int(i) for i in ids if i >= 0], texts))
    return out


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db")
    parser.add_argument("--ckpt", default="runs/default/retro/ckpt.pt")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--service", help="retrieve through the index service at this URL instead of the local index")
    args = parser.parse_args()
    retriever = ServiceRetriever.for_db(args.service, args.db, k=args.k) if args.service else None
    for u, chunk in enumerate(generate_text(args.db, args.ckpt, args.prompt, max_new_tokens=args.tokens, k=args.k,
                                            temperature=args.temperature, retriever=retriever)):
        print(f"--- chunk {u}: {chunk.text!r}")
        for cid, text in zip(chunk.neighbour_chunk_ids, chunk.neighbour_texts):
            print(f"    neighbour {cid}: {text[:120]!r}")


if __name__ == "__main__":
    cli.run(main, "model.generate")
