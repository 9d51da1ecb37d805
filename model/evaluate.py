"""Evaluation in bits per byte, with retrieval on and off, and bpb(alpha) by the paper's leakage measure.

    python -m model.evaluate --db db --run runs/default      # writes runs/default/eval.json

bpb = sum of next-token losses (nats) / ln 2 / UTF-8 bytes of the predicted tokens. For bpb(alpha),
each evaluation chunk C gets r(C) = the longest common token substring between C and the
neighbours that condition its tokens (those retrieved by the preceding chunk, [N, F] tokens), over
m; bpb(alpha) covers the chunks with r(C) <= alpha (alpha = 12.5%: fewer than 8 shared tokens).
Evaluation neighbours are the stored ones (k_eval, up to 10), the first k used by the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

import numpy as np
import torch

from model.data import RetroSequences, longest_common_substring
from model.train import load_model
from retro_db import cli

log = logging.getLogger("model.evaluate")

ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def evaluate(model, data: RetroSequences, *, retrieval: bool, batch_size: int = 8, device: str = "cpu", max_sequences: int = 0) -> dict:
    """bpb over a split, and per-chunk sums for bpb(alpha). Chunks: (nats, bytes, leakage r(C))."""
    model.eval().to(device)
    m, n = data.m, len(data) if not max_sequences else min(len(data), max_sequences)
    nats = bytes_ = 0.0
    per_chunk = []
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        x, y, neighbours, target_bytes, ids = [torch.stack(t) for t in zip(*items)]
        _, _, token_loss = model(x.to(device), neighbours.to(device) if retrieval and model.config.retrieval else None, y.to(device))
        token_loss = token_loss.float().cpu().numpy()
        nats += float(token_loss.sum())
        bytes_ += float(target_bytes.sum())
        # per evaluation chunk: losses of its tokens (targets inside it), and r(C) against the
        # neighbours of the chunk before it, which are what its tokens attend to through CCA
        b, l = ids.shape
        chunk_nats = token_loss.reshape(b, l, m).sum(-1)
        chunk_bytes = target_bytes.numpy().reshape(b, l, m).sum(-1)
        for row in range(b):
            for u in range(l):
                target = y[row].numpy().reshape(l, m)[u]
                tokens = target[target >= 0]
                prev = neighbours[row, u - 1].numpy() if u > 0 else np.zeros((0, 2 * m), dtype=np.int64)
                retrieved = [r[r != data.pad_id] for r in prev]
                leak = max((longest_common_substring(tokens, r) for r in retrieved), default=0) / m
                per_chunk.append((float(chunk_nats[row, u]), int(chunk_bytes[row, u]), leak))
    bpb = nats / math.log(2) / max(bytes_, 1.0)
    chunks = np.array(per_chunk, dtype=np.float64).reshape(-1, 3)
    by_alpha = {}
    for alpha in ALPHAS:
        sel = chunks[:, 2] <= alpha + 1e-9
        by_alpha[f"{alpha:g}"] = {"bpb": float(chunks[sel, 0].sum() / math.log(2) / max(chunks[sel, 1].sum(), 1.0)) if sel.any() else None,
                                  "chunks": int(sel.sum())}
    return {"bpb": round(bpb, 5), "bytes": int(bytes_), "sequences": n, "bpb_by_alpha": by_alpha}


def evaluate_run(db: str, run: str, *, splits=("valid", "test"), device: str | None = None, k: int = 2) -> dict:
    """retro_on, retro_off and baseline, per split, into ``run``/eval.json."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    missing = [name for name in ("retro", "baseline") if not os.path.exists(os.path.join(run, name, "ckpt.pt"))]
    if missing:
        raise FileNotFoundError(f"{run}: no {' or '.join(missing)} checkpoint ({os.path.join(run, missing[0], 'ckpt.pt')}); "
                                f"train the run first (make train DB={db} RUN={run})")
    retro, _ = load_model(os.path.join(run, "retro", "ckpt.pt"))
    baseline, _ = load_model(os.path.join(run, "baseline", "ckpt.pt"))
    results = {"retro_on": {}, "retro_off": {}, "baseline": {}}
    for split in splits:
        data = RetroSequences(db, split, chunks_per_seq=retro.config.max_chunks, k=k)
        results["retro_on"][split] = evaluate(retro, data, retrieval=True, device=device)
        results["retro_off"][split] = evaluate(retro, data, retrieval=False, device=device)
        results["baseline"][split] = evaluate(baseline, data, retrieval=False, device=device)
    for name in results:  # the contract: each holds the test split's bpb at top level
        results[name]["bpb"] = results[name]["test"]["bpb"]
    with open(os.path.join(run, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def table(results: dict) -> str:
    lines = [f"{'model':12s} {'valid bpb':>10s} {'test bpb':>10s}   test bpb(alpha) for alpha = " + ", ".join(f"{a:g}" for a in ALPHAS)]
    for name, r in results.items():
        alphas = "  ".join("   -  " if r["test"]["bpb_by_alpha"][f"{a:g}"]["bpb"] is None else f"{r['test']['bpb_by_alpha'][f'{a:g}']['bpb']:.3f}" for a in ALPHAS)
        lines.append(f"{name:12s} {r['valid']['bpb']:10.4f} {r['test']['bpb']:10.4f}   {alphas}")
    counts = results["retro_on"]["test"]["bpb_by_alpha"]
    lines.append("chunks per alpha (test): " + ", ".join(f"{a}: {v['chunks']}" for a, v in counts.items()))
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db")
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--device")
    args = parser.parse_args()
    results = evaluate_run(args.db, args.run, device=args.device)
    print(table(results))
    print(f"written to {os.path.join(args.run, 'eval.json')}")


if __name__ == "__main__":
    cli.run(main, "model.evaluate")
