"""Training RETRO (or the baseline) from a built DB: a plain loop, nanoGPT style.

    python -m model.train --db db --out runs/default/retro [--baseline] [--retrofit runs/x/baseline/ckpt.pt]
    torchrun --nproc_per_node 8 -m model.train --db db --out runs/big --config paper-172m   # DDP

AdamW, linear warm-up then cosine decay to 10% (the paper's schedule), gradient clipping and
accumulation, bf16 autocast on CUDA, checkpoints holding the model config, optimizer, step, data
order and RNG states so that a resumed run continues exactly. With ``--retrofit`` the decoder is
loaded from a baseline checkpoint and frozen; only the encoder and CCA layers train. With ``--base``
a pretrained Hugging Face decoder is RETRO-fitted the same way (``model.retrofit``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from model import checkpoint
from model.data import RetroSequences
from model.model import Retro, RetroConfig, paper_172m_config, rows_sharing_runs, tiny_config
from model.retrofit import READERS, RetroFit, retrofit_config
from retro_db import cli
from retro_db.manifest import require_stages
from retro_db.tokenizer import PAD, db_tokenizer, special_id

log = logging.getLogger("model.train")


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    k: int = 2
    seed: int = 0
    checkpoint_every: int = 200
    informative: float = 0.0  # share of sequences given constructed informative neighbours (recipe_neighbours)
    informative_edit: float = 0.1  # share of a constructed neighbour's tokens replaced at random
    informative_shift: int = 32  # a constructed neighbour starts up to this many tokens off its chunk's start
    neighbour_dropout: float = 0.0  # chance that a retrieved neighbour is dropped
    max_retrieved_overlap: float = 1.0  # retrieved rows sharing a longer run of the chunk they condition: dropped
    retrofit: str = ""  # a baseline checkpoint whose decoder is loaded and frozen


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun (gloo on CPU, nccl on GPU)."""
    if "RANK" not in os.environ:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_ranks_sum(value: float, world: int, device: str) -> float:
    if world == 1:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t)


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step: int, micro: int, cfg: TrainConfig, n: int, rank: int, world: int) -> np.ndarray:
    """The dataset indices of one micro-batch: a pure function of (step, micro, rank), so resuming
    at a step reproduces the data order exactly and ranks never overlap."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    start = step * per_step + (micro * world + rank) * cfg.batch_size
    positions = np.arange(start, start + cfg.batch_size)
    epochs, offsets = positions // n, positions % n
    return np.array([epoch_order(n, int(e), cfg.seed)[o] for e, o in zip(epochs, offsets)])


def collate(dataset, indices):
    items = [dataset[int(i)] for i in indices]
    return [torch.stack(x) for x in zip(*items)]


def recipe_neighbours(x: torch.Tensor, neighbours: torch.Tensor, cfg: TrainConfig, config: RetroConfig, rng):
    """The neighbours a training step feeds (b, l, k, r), from a batch's tokens x (b, l*m) and retrieved rows:
    each retrieved row of chunk u that shares a run of more than ``max_retrieved_overlap`` of chunk u+1's
    tokens (those it conditions) is dropped (all padding), as is any with chance ``neighbour_dropout``; and in a
    share ``informative`` of the sequences, one random slot of every chunk u holds a neighbour made from the
    sequence itself: its 2m tokens from u*m + s, s uniform in [-``informative_shift``, ``informative_shift``]
    (at most m), with a share ``informative_edit`` of them replaced by random tokens (another version of a text
    differs). On ordinary documents retrieval rarely finds a chunk's continuation, so without these a model
    learns to ignore its neighbours; with them it learns to copy from those that hold what it is about to write
    and, from the retrieved ones beside them, to ignore those that do not. A DB that holds versions of its
    documents retrieves continuations for many chunks: the overlap cap keeps the share of sequences that teach
    copying the recipe's, not the DB's."""
    b, l, k, r = neighbours.shape
    m, pad = config.chunk_size, config.pad_id
    out, shift = neighbours.clone(), min(cfg.informative_shift, m)
    if cfg.max_retrieved_overlap < 1.0:  # rows of chunks 0..l-2 against the chunks they condition, 1..l-1
        conditioned = x.cpu().reshape(b, l, m)[:, 1:]
        out[:, :-1][rows_sharing_runs(conditioned, out[:, :-1], pad, cfg.max_retrieved_overlap)] = pad
    if cfg.neighbour_dropout:
        out[torch.from_numpy(rng.random((b, l, k)) < cfg.neighbour_dropout)] = pad
    padded = torch.cat([torch.full((b, m), pad), x.cpu(), torch.full((b, r + m), pad)], 1)  # (b, m + l*m + r + m)
    for i in np.flatnonzero(rng.random(b) < cfg.informative):
        for u in range(l):
            start = m + u * m + int(rng.integers(-shift, shift + 1))
            row = padded[i, start : start + r].clone()
            edit = torch.from_numpy(rng.random(r) < cfg.informative_edit) & (row != pad)
            random_tokens = torch.from_numpy(rng.integers(0, config.vocab_size, r))
            row[edit] = torch.where(random_tokens[edit] == pad, 0, random_tokens[edit])
            out[i, u, int(rng.integers(k))] = row
    return out


def build_model(name: str, vocab_size: int, pad_id: int, baseline: bool, **overrides) -> RetroConfig:
    make = {"tiny": tiny_config, "paper-172m": paper_172m_config}[name]
    return make(vocab_size=vocab_size, pad_id=pad_id, retrieval=not baseline, **overrides)


def retrofit_base(base: str, vocab_size: int, pad_id: int, reader: str = "attention", **overrides):
    """A RetroFit of the base ``base`` (a model directory, a .gguf file or ``smollm2-135m``) for a DB of
    ``vocab_size`` tokens: the DB's tokenizer is the base's, plus its padding token at most. ``reader``:
    how it reads neighbours (``model.retrofit``); ``overrides``: other ``RetroConfig`` fields."""
    from model import base_lm

    directory = base_lm.resolve(base)
    lm = base_lm.load(directory)
    if not 0 <= vocab_size - lm.config.vocab_size <= 1:
        raise ValueError(
            f"the DB's tokenizer has {vocab_size} tokens, the base {directory} {lm.config.vocab_size}: "
            "build the DB with the base's tokenizer (make build-db BASE=...)"
        )
    config = retrofit_config(
        lm,
        pad_id=pad_id,
        vocab_size=vocab_size,
        reader=reader,
        **overrides,
        base=directory,
        base_sha256=base_lm.weights_sha256(directory),
    )
    return RetroFit(lm, config)


def train(
    db: str,
    out: str,
    *,
    config_name: str = "tiny",
    baseline: bool = False,
    retrofit: str | None = None,
    base: str | None = None,
    reader: str = "attention",
    min_query_overlap: float | None = None,
    cfg: TrainConfig | None = None,
    device: str | None = None,
) -> dict:
    """Trains into ``out`` (ckpt.pt, log.jsonl), resuming from ``out/ckpt.pt`` when present. ``base``: a
    pretrained Hugging Face decoder (``model.base_lm.resolve``) to RETRO-fit, frozen, read by ``reader``.
    ``min_query_overlap``: the model's (``RetroConfig``); None: its default (the reader's, for a RETRO-fit)."""
    data_sha256 = checkpoint.data_fingerprint(require_stages(db, ("chunks", "embeddings", "index", "neighbours")))
    cfg = cfg or TrainConfig()
    rank, world = distributed()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    torch.manual_seed(cfg.seed)
    os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, checkpoint.CHECKPOINT)
    if retrofit:
        cfg = replace(cfg, retrofit=retrofit)
    if os.path.exists(ckpt_path):
        model, ckpt = checkpoint.load(ckpt_path)
        if ckpt.get("data_sha256", data_sha256) != data_sha256:
            raise ValueError(
                f"{ckpt_path} was trained on other data than {db} holds now (its train chunks or neighbour tables "
                "were rebuilt): give another --out, or remove the checkpoint to start over"
            )
        start, cfg = ckpt["step"], replace(cfg, retrofit=ckpt["train_config"].get("retrofit", ""))
        if min_query_overlap not in (None, model.config.min_query_overlap):
            raise ValueError(
                f"{ckpt_path} reads neighbours with min_query_overlap {model.config.min_query_overlap}, "
                f"not {min_query_overlap}: give another --out to train another model"
            )
        log.info("resuming %s at step %d", ckpt_path, start)
    else:
        ckpt, start = None, 0
        tokenizer = db_tokenizer(db)
        vocab, pad = tokenizer.get_vocab_size(), special_id(tokenizer, PAD)
        if base:
            model = retrofit_base(base, vocab, pad, reader, min_query_overlap=min_query_overlap)
        else:
            overrides = {} if min_query_overlap is None else {"min_query_overlap": min_query_overlap}
            model = Retro(build_model(config_name, vocab, pad, baseline, **overrides))
        if cfg.retrofit:
            base, _ = checkpoint.load(cfg.retrofit)
            _, unexpected = model.load_state_dict(base.state_dict(), strict=False)
            if unexpected:
                raise ValueError(f"{cfg.retrofit} is not a baseline of this shape: unexpected {unexpected[:3]}")
    model_config = model.config
    data = RetroSequences(
        db, "train", chunks_per_seq=model_config.max_chunks, k=cfg.k, align=model_config.align_neighbours
    )
    if cfg.retrofit or model_config.base:
        retrieval = {id(p) for p in model.retrieval_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in retrieval)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=device.startswith("cuda"),
    )
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[int(os.environ.get("LOCAL_RANK", 0))] if device.startswith("cuda") else None
        )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    use_neighbours = model_config.retrieval
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * model_config.max_chunks * model_config.chunk_size
    log_path = os.path.join(out, "log.jsonl")
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=os.path.basename(out.rstrip("/")),
        unit="step",
        disable=rank != 0,
        mininterval=5,
    )
    t0, last = time.perf_counter(), {}
    recipe = cfg.informative or cfg.neighbour_dropout or cfg.max_retrieved_overlap < 1.0
    model.train()
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batches = [collate(data, batch_indices(step, m, cfg, len(data), rank, world)) for m in range(cfg.grad_accum)]
        # a step's loss is the mean over all its target tokens, across micro-batches and ranks, so that any split
        # of one global batch gives the gradient one process gives it (DDP averages over ranks: hence * world)
        step_tokens = all_ranks_sum(sum(float((y != -100).sum()) for _, y, *_ in batches), world, device)
        loss_sum = 0.0
        for micro, (x, y, neighbours, _, _) in enumerate(batches):
            if use_neighbours and recipe:  # reproducible on resume
                rng = np.random.default_rng([cfg.seed, step, micro, rank])
                neighbours = recipe_neighbours(x, neighbours, cfg, model_config, rng)
            x, y, neighbours = x.to(device), y.to(device), neighbours.to(device)
            with autocast:
                _, _, token_loss = ddp_model(x, neighbours if use_neighbours else None, y)
            micro_sum = token_loss.sum()
            (micro_sum * (world / step_tokens)).backward()
            loss_sum += micro_sum.item()
        total = all_ranks_sum(loss_sum, world, device) / step_tokens
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if rank == 0 and ((step + 1) % 10 == 0 or step + 1 == cfg.steps):
            elapsed = time.perf_counter() - t0
            last = {
                "step": step + 1,
                "loss": round(total, 4),
                "lr": lr_at(step, cfg),
                "grad_norm": round(float(norm), 3),
                "tokens_per_s": round(tokens_per_step * (step + 1 - start) / elapsed, 1),
            }
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            with open(log_path, "a") as f:
                f.write(json.dumps(last) + "\n")
        if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            checkpoint.save(ckpt_path, model, optimizer, step + 1, model_config, cfg, data_sha256)
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    return last


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db")
    parser.add_argument("--out", required=True, help="run directory of this model (checkpoint and log)")
    parser.add_argument("--config", default="tiny", choices=("tiny", "paper-172m"))
    parser.add_argument("--baseline", action="store_true", help="the same decoder without retrieval")
    parser.add_argument("--retrofit", help="a baseline checkpoint to freeze; train only encoder and CCA")
    parser.add_argument(
        "--base",
        help="a pretrained decoder to RETRO-fit, frozen: a Hugging Face model directory, "
        "a .gguf file or smollm2-135m (the packaged SmolLM2-135M)",
    )
    parser.add_argument(
        "--reader",
        choices=READERS,
        default="attention",
        help="with --base, how the RETRO-fit reads neighbours: the base's own attention, gated (attention), "
        "or the paper's encoder and CCA blocks (cca)",
    )
    parser.add_argument(
        "--min-query-overlap",
        type=float,
        help="the model reads a neighbour only if it shares a run of more than this share of the chunk that "
        "retrieved it (default: 0.1 for the attention reader, else 0: every neighbour)",
    )
    parser.add_argument("--device")
    cli.add_config_flags(parser, TrainConfig, skip=("retrofit",))
    return parser


# A RETRO-fit's defaults (``--base``) per reader: the recipes docs/BENCHMARKS.md measured. A frozen base
# needs fewer steps than a model from scratch, and constructed neighbours to learn when to copy; the
# attention reader trains one gate per layer and head, which need a large rate and no decay towards 0.
RETROFIT_DEFAULTS = {
    "attention": dict(
        steps=60,
        batch_size=4,
        lr=0.05,
        warmup_steps=5,
        weight_decay=0.0,
        informative=0.5,
        max_retrieved_overlap=0.25,
        checkpoint_every=20,
    ),
    "cca": dict(steps=200, batch_size=4, lr=1e-3, warmup_steps=10, informative=0.5, checkpoint_every=20),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; with ``--base`` the ones not given default to ``RETROFIT_DEFAULTS`` of the reader."""
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.base:
        parser.set_defaults(**{f"TrainConfig.{k}": v for k, v in RETROFIT_DEFAULTS[first.reader].items()})
    return parser.parse_args(argv)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    args = parse_args()
    cfg = cli.config_from_args(TrainConfig, args)
    last = train(
        args.db,
        args.out,
        config_name=args.config,
        baseline=args.baseline,
        retrofit=args.retrofit,
        base=args.base,
        reader=args.reader,
        min_query_overlap=args.min_query_overlap,
        cfg=cfg,
        device=args.device,
    )
    log.info("done: %s", last)


if __name__ == "__main__":
    cli.run(main, "model.train")
