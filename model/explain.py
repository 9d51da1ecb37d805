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


@torch.no_grad()
def token_logprobs(model, tokens: list[int], retrieved: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """log p(token i | the tokens before it) in nats, with the [N, F] rows ``retrieved[u]`` (k, 2m) of
    chunk u and with none: (t,), (t,) float64, NaN at i = 0 (nothing predicts the first token).

    One forward pass per distinct context window, batched, for each of the two conditions.
    """
    cfg = model.config
    m, pad, L = cfg.chunk_size, cfg.pad_id, cfg.max_chunks
    model.eval()
    device = next(model.parameters()).device
    t = len(tokens)
    n_chunks = -(-t // m)
    # windows: chunks 0..L-1 score every chunk below L; then the window ending at chunk u scores chunk u
    firsts = sorted({window_start(u, L) for u in range(n_chunks)})
    l = min(L, n_chunks)
    idx = torch.full((len(firsts), l * m), pad, dtype=torch.long)
    for w, first in enumerate(firsts):
        window = tokens[first * m : (first + l) * m]
        idx[w, : len(window)] = torch.tensor(window, dtype=torch.long)
    out = []
    for use in (True, False):
        neighbours = None
        if use and cfg.retrieval:
            rows = [window_neighbours(retrieved, first, l, pad) for first in firsts]
            if any(r is not None for r in rows):
                shape = next(r for r in rows if r is not None).shape[1:]
                neighbours = torch.cat([r if r is not None else torch.full((1, *shape), pad, dtype=torch.long) for r in rows])
        logits, _, _ = model(idx.to(device), None if neighbours is None else neighbours.to(device))
        logp = F.log_softmax(logits.float(), -1).cpu()  # (w, l*m, vocab)
        scores = np.full(t, np.nan)
        for i in range(1, t):
            u = i // m
            w = firsts.index(window_start(u, L))
            j = i - firsts[w] * m  # position of token i in window w; predicted at j - 1
            scores[i] = float(logp[w, j - 1, tokens[i]])
        out.append(scores)
    return out[0], out[1]
