"""Training throughput of our RETRO against lucidrains' retro-pytorch, same shapes, same cores.

Both train the same shape (6 decoder layers, width 256, 8 heads of 32, 2 encoder layers, CCA at
layers 3 and 6, chunk 64, k=2 neighbours of r=128 tokens, sequences of 4 chunks, batch 8,
vocabulary 8192) on random tokens with AdamW, and report tokens/s over timed steps after warm-up.
The width is not the tiny config's 128: retro-pytorch 0.3.9 passes ``dim_head`` but not ``heads``
to its encoder and decoder, which always use 8 heads, so at width 128 with 4 heads of 32 it
computes 8 heads (256-wide attention) and the two models would not be the same size. At 8 heads
of 32 both compute what they are asked; parameter counts are printed beside the figures.
retro-pytorch pins numpy<2, so it runs in its own venv (``.venv-retro-pytorch``, made by
``make bench-train``) as a subprocess of this command.

    python -m bench.train_throughput [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPE = dict(
    batch=8, chunks=4, chunk=64, k=2, vocab=8192, layers=6, width=256, heads=8, enc_layers=2, cca=[3, 6]
)  # heads: 8 (see above)

THEIRS = (
    r"""
import json, sys, time, torch
from retro_pytorch import RETRO
s, steps, threads = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads); torch.manual_seed(0)
model = RETRO(num_tokens=s["vocab"], max_seq_len=s["chunks"] * s["chunk"], enc_dim=s["width"], """
    r"""enc_depth=s["enc_layers"],
              dec_dim=s["width"], dec_depth=s["layers"], dec_cross_attn_layers=tuple(s["cca"]), heads=s["heads"],
              dim_head=s["width"] // s["heads"], chunk_size=s["chunk"])
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
seq = torch.randint(1, s["vocab"], (s["batch"], s["chunks"] * s["chunk"] + 1))
retrieved = torch.randint(1, s["vocab"], (s["batch"], s["chunks"], s["k"], 2 * s["chunk"]))
def step():
    loss = model(seq, retrieved, return_loss=True); loss.backward(); opt.step(); opt.zero_grad()
for _ in range(2): step()
t0 = time.perf_counter()
for _ in range(steps): step()
print(json.dumps({"seconds": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters())}))
"""
)


def ours(steps: int, threads: int) -> dict:
    import torch

    from model.model import Retro, tiny_config

    s = SHAPE
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Retro(
        tiny_config(
            vocab_size=s["vocab"],
            n_layer=s["layers"],
            n_embd=s["width"],
            n_head=s["heads"],
            enc_n_layer=s["enc_layers"],
            cca_layers=s["cca"],
            chunk_size=s["chunk"],
            max_chunks=s["chunks"],
            pad_id=0,
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(1, s["vocab"], (s["batch"], s["chunks"] * s["chunk"]))
    y = torch.randint(1, s["vocab"], (s["batch"], s["chunks"] * s["chunk"]))
    retrieved = torch.randint(1, s["vocab"], (s["batch"], s["chunks"], s["k"], 2 * s["chunk"]))

    def step():
        _, loss, _ = model(x, retrieved, y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"seconds": time.perf_counter() - t0, "params": model.num_params()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--theirs-python", default=".venv-retro-pytorch/bin/python")
    args = parser.parse_args()
    tokens = SHAPE["batch"] * SHAPE["chunks"] * SHAPE["chunk"] * args.steps
    mine = ours(args.steps, args.threads)
    done = subprocess.run(
        [args.theirs_python, "-c", THEIRS, json.dumps(SHAPE), str(args.steps), str(args.threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"shape {SHAPE}, {args.steps} timed steps, {args.threads} threads")
    for name, r in (("ours (model.model.Retro)", mine), ("lucidrains retro-pytorch 0.3.9", theirs)):
        print(f"{name:32s} {r['params'] / 1e6:6.2f} M params  {tokens / r['seconds']:9,.0f} tokens/s")
    print(f"ratio ours / retro-pytorch: {theirs['seconds'] / mine['seconds']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
