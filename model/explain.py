"""What retrieval did to each token: its log-probability with and without the retrieved neighbours.

The paper shows this as tables that colour every token by how much retrieval changed its loss,
with each chunk's neighbours beside it (Tables 16-19). Chunk u's neighbours condition the tokens
of chunk u+1 (through CCA, from the last token of chunk u on), so a token's two figures differ
only through the neighbours retrieved by the chunk before it.

Each token is scored from the context generation gives it (``model.generate.window_start``): the
last ``max_chunks`` whole chunks, so the figures of a generated text are the ones its sampling saw.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.generate import window_neighbours, window_start


def conditioning_chunks(n_tokens: int, chunk_size: int) -> list[int]:
    """The chunks whose neighbours condition some token of an ``n_tokens`` text: chunk u's condition
    chunk u+1, so a chunk with no token after it retrieves nothing."""
    return list(range((n_tokens - 1) // chunk_size))


@torch.no_grad()
def token_logprobs(model, tokens: list[int], retrieved: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """log p(token i | the tokens before it) in nats, with the [N, F] rows ``retrieved[u]`` (k, 2m) of
    chunk u and with none: (t,), (t,) float64, NaN at i = 0 (nothing predicts the first token).

    One forward pass per distinct context window for each of the two conditions, in batches of
    windows whose logits stay near 64 MB.
    """
    cfg = model.config
    m, pad, L = cfg.chunk_size, cfg.pad_id, cfg.max_chunks
    model.eval()
    device = next(model.parameters()).device
    t = len(tokens)
    n_chunks = -(-t // m)
    # window w covers chunks w..w+l-1: the first scores every chunk below L, each later one the chunk it ends at
    n_windows, l = window_start(n_chunks - 1, L) + 1, min(L, n_chunks)
    idx = torch.full((n_windows, l * m), pad, dtype=torch.long)
    for w in range(n_windows):
        window = tokens[w * m : (w + l) * m]
        idx[w, : len(window)] = torch.tensor(window, dtype=torch.long)
    rows = [window_neighbours(retrieved, w, l, pad) if cfg.retrieval else None for w in range(n_windows)]
    present = [r for r in rows if r is not None]
    neighbours = (
        torch.cat([r if r is not None else torch.full_like(present[0], pad) for r in rows]) if present else None
    )
    # token i (i >= 1) is predicted in window w(i) = window_start(its chunk), at position i - 1 - w(i) * m
    positions = np.arange(1, t)
    window_of = np.array([window_start(u, L) for u in range(n_chunks)])[positions // m]
    at = positions - 1 - window_of * m
    group = max(1, (16 << 20) // (l * m * cfg.vocab_size))
    target = torch.tensor(tokens[1:], dtype=torch.long)
    out = []
    for nb in (neighbours, None):
        scores = np.full(t, np.nan)
        for g in range(0, n_windows, group):
            logits, _, _ = model(idx[g : g + group].to(device), None if nb is None else nb[g : g + group].to(device))
            logp = F.log_softmax(logits.float(), -1).cpu()  # (windows, l*m, vocab)
            mine = (window_of >= g) & (window_of < g + group)
            scores[positions[mine]] = logp[window_of[mine] - g, at[mine], target[mine]].double().numpy()
        out.append(scores)
    return out[0], out[1]
