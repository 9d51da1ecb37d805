"""The checkpoint format: what a RETRO checkpoint holds, and the one place that writes and reads it.

A checkpoint (``RUN/retro/ckpt.pt``, ``RUN/baseline/ckpt.pt`` as ``make train`` lays them out) is one
``torch.save`` dict:

    model          the model's state dict (of a RETRO-fitted base: the encoder and CCA only; the base
                   is referenced by ``model_config.base`` and ``base_sha256``, never copied)
    optimizer      AdamW's state (a resumed run continues exactly)
    step           optimizer steps taken
    model_config   ``RetroConfig.to_dict()``: the model is rebuilt from it alone
    train_config   ``TrainConfig`` as a dict (k neighbours, schedule, seed, retrofit base)
    data_sha256    what it was trained on (``data_fingerprint``): a resume refuses other data
    rng            torch and numpy RNG states

Training saves and resumes it; evaluation, generation and the service load it and read its
``summary`` (k, chunk size, vocabulary) to line the DB up with what the model was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import numpy as np
import torch

from model.model import Retro, RetroConfig

CHECKPOINT = "ckpt.pt"
DEFAULT_K = 2  # the paper's training k; what checkpoints that predate train_config's k were trained with


def data_fingerprint(manifest: dict) -> str:
    """What a run learns from: the train chunk shards and how their neighbour tables were built
    (config and index shards; not the tables' bytes, which deletions refresh). A checkpoint resumes
    only on the same: a DB rebuilt in place (other duplicates kept, another k) is other data."""
    stages = manifest["stages"]
    chunks = sorted(s["chunks_file"]["sha256"] for s in stages["chunks"]["shards"] if s["split"] == "train")
    return hashlib.sha256(json.dumps([chunks, stages["neighbours"]["config"]], sort_keys=True).encode()).hexdigest()


def save(path: str, model, optimizer, step: int, model_config: RetroConfig, train_config, data_sha256: str) -> None:
    """Writes the checkpoint atomically (a kill mid-write leaves the previous one)."""
    state = {
        "model": (model.module if hasattr(model, "module") else model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "model_config": model_config.to_dict(),
        "train_config": asdict(train_config),
        "data_sha256": data_sha256,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def model_config(ckpt: dict) -> RetroConfig:
    return RetroConfig(**{"align_neighbours": False, **ckpt["model_config"]})  # checkpoints from before alignment


def build(config: RetroConfig):
    """The model of ``config``: RETRO from scratch, or a RETRO-fitted base (``config.base``) loaded and checked."""
    if not config.base:
        return Retro(config)
    from model import base_lm
    from model.retrofit import RetroFit

    return RetroFit(base_lm.load(config.base, config.base_sha256), config)


def load(path: str, map_location="cpu") -> tuple[Retro, dict]:
    """The model rebuilt from the checkpoint at ``path``, and the checkpoint's dict."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train one first (make train DB=<db> RUN=<run>)")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    model = build(model_config(ckpt))
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def trained_k(ckpt: dict) -> int:
    """Neighbours per chunk the model was trained with: evaluation's and generation's default."""
    return ckpt.get("train_config", {}).get("k", DEFAULT_K)


def resolve(run: str) -> str:
    """A checkpoint file, or the run directory of ``make train`` (RUN/retro/ckpt.pt, else RUN/ckpt.pt)."""
    for path in (run, os.path.join(run, "retro", CHECKPOINT), os.path.join(run, CHECKPOINT)):
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise FileNotFoundError(
        f"no checkpoint at {run} (nor {run}/retro/{CHECKPOINT}, {run}/{CHECKPOINT}); "
        f"train one first: make train DB=<db> RUN={run}"
    )


def summary(path: str) -> dict:
    """What a server and a page need to know of a checkpoint, read without building the model."""
    # the configs only: weights and optimizer stay on disk
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    config = model_config(ckpt)
    return {
        "checkpoint": path,
        "step": ckpt.get("step"),
        "retrieval": config.retrieval,
        "chunk_size": config.chunk_size,
        "max_chunks": config.max_chunks,
        "vocab_size": config.vocab_size,
        "k": trained_k(ckpt),
        "n_layer": config.n_layer,
        "n_embd": config.n_embd,
        "align_neighbours": config.align_neighbours,
    }


def check_fits_db(summary: dict, *, chunk_size: int, vocab_size: int) -> None:
    """A model trained on another DB's tokenizer or chunk size would read its neighbours as noise."""
    if summary["chunk_size"] != chunk_size or summary["vocab_size"] != vocab_size:
        raise ValueError(
            f"{summary['checkpoint']} was trained for chunks of {summary['chunk_size']} tokens and a vocabulary of "
            f"{summary['vocab_size']}; this DB has {chunk_size} and {vocab_size}: "
            "serve it with the DB it was trained on"
        )
