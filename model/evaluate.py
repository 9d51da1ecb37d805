"""Evaluation in bits per byte, with retrieval on and off, bpb(alpha) by the paper's leakage measure,
and paired bootstrap intervals on the differences that matter.

    python -m model.evaluate --db db --run runs/default                  # valid/test -> runs/default/eval.json
    python -m model.evaluate --db db --run runs/default --corpus new.jsonl --out new-eval.json

bpb = sum of next-token losses (nats) / ln 2 / bytes of the predicted tokens (UTF-8 bytes of their
text; a predicted ``<|endoftext|>`` counts one byte, ``model.data.evaluation_byte_lengths``).

Leakage (the paper's section 4.4 and appendix): every evaluation chunk C, a sequence's first one
included, gets r(C) = the longest contiguous token run that C shares with any of its own nearest
training neighbours [N, F] (up to ``K_LEAKAGE`` = 10), divided by C's length; bpb(alpha) covers
the chunks with r(C) <= alpha, their tokens' losses over their bytes (alpha = 0.125: fewer than 8
of 64 tokens in a row). r(C) describes the data, not the model: the same for the three models.

Intervals: for retro_on - retro_off and retro_on - baseline, the difference in bpb on the same
chunks and its 95% percentile interval from ``resamples`` bootstrap draws of evaluation chunks
(paired: a draw takes a chunk's losses under both models). An interval holding 0 is no difference.

On a DB's own splits neighbours are the stored tables (``k_eval`` per chunk). With ``--corpus``
any text is read (JSONL, JSONL.zst, Parquet, text) and retrieved live from the DB as it is now
(``model.data.CorpusSequences``: increments included, deletions honoured, copies of the
evaluated document excluded).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

import numpy as np
import torch

from model import checkpoint
from model.data import CorpusSequences, RetroSequences
from retro_db import cli
from retro_db.manifest import require_stages

log = logging.getLogger("model.evaluate")

ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)
K_LEAKAGE = 10  # the paper's neighbours per chunk for r(C)
DIFFERENCES = (("retro_on", "retro_off"), ("retro_on", "baseline"))


def longest_common_run(chunk: np.ndarray, neighbours: np.ndarray) -> int:
    """The longest contiguous token run shared by ``chunk`` (n,) and any row of ``neighbours`` (k, r),
    padding excluded by the caller (pass -1 there: it matches nothing). Dynamic programming over
    the chunk, all neighbours at once."""
    if not len(chunk) or not neighbours.size:
        return 0
    best, prev = 0, np.zeros((neighbours.shape[0], neighbours.shape[1] + 1), dtype=np.int32)
    for token in chunk:
        cur = np.zeros_like(prev)
        cur[:, 1:] = np.where(neighbours == token, prev[:, :-1] + 1, 0)
        best = max(best, int(cur.max()))
        prev = cur
    return best


def chunk_leakage(data, k: int = K_LEAKAGE) -> np.ndarray:
    """r(C) of every evaluation chunk, in the order ``chunk_scores`` gives them. (n,)"""
    out = []
    for i in range(len(data)):
        x, _, neighbours, _, _ = data[i]
        chunks = x.numpy().reshape(data.l, data.m)
        rows = neighbours[:, :k].numpy()  # (l, k, 2m): chunk u's own neighbours
        rows = np.where(rows == data.pad_id, -1, rows)
        for u in range(data.l):
            chunk = chunks[u][chunks[u] != data.pad_id]
            out.append(longest_common_run(chunk, rows[u]) / max(len(chunk), 1))
    return np.array(out, dtype=np.float64)


@torch.no_grad()
def chunk_scores(
    model, data, *, retrieval: bool, k: int, batch_size: int = 8, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Per evaluation chunk (sequence order, l per sequence): the losses in nats of the tokens
    predicted at its positions and their bytes. (n,), (n,)"""
    model.eval().to(device)
    nats, bytes_ = [], []
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(len(data), start + batch_size))]
        x, y, neighbours, target_bytes, _ = [torch.stack(t) for t in zip(*items)]
        use = neighbours[:, :, :k].to(device) if retrieval and model.config.retrieval else None
        _, _, token_loss = model(x.to(device), use, y.to(device))
        b = x.shape[0]
        nats.append(token_loss.float().cpu().numpy().reshape(b * data.l, data.m).sum(-1))
        bytes_.append(target_bytes.numpy().reshape(b * data.l, data.m).sum(-1))
    return np.concatenate(nats).astype(np.float64), np.concatenate(bytes_).astype(np.float64)


def bpb(nats: np.ndarray, bytes_: np.ndarray) -> float:
    return float(nats.sum() / math.log(2) / max(bytes_.sum(), 1.0))


def summary(nats: np.ndarray, bytes_: np.ndarray, leakage: np.ndarray) -> dict:
    """bpb, bytes, chunks and bpb(alpha) of one model on one evaluation set."""
    scored = bytes_ > 0  # chunks of the last sequence's padding predict nothing
    by_alpha = {}
    for alpha in ALPHAS:
        sel = scored & (leakage <= alpha + 1e-9)
        by_alpha[f"{alpha:g}"] = {
            "bpb": round(bpb(nats[sel], bytes_[sel]), 5) if sel.any() else None,
            "chunks": int(sel.sum()),
        }
    return {
        "bpb": round(bpb(nats, bytes_), 5),
        "bytes": int(bytes_.sum()),
        "chunks": int(scored.sum()),
        "bpb_by_alpha": by_alpha,
    }


def paired_difference(
    nats_a: np.ndarray, nats_b: np.ndarray, bytes_: np.ndarray, *, resamples: int = 2000, seed: int = 0
) -> dict:
    """bpb(a) - bpb(b) on the same chunks, with its 95% paired bootstrap interval over chunks."""
    scored = bytes_ > 0
    diff, weight = (nats_a - nats_b)[scored] / math.log(2), bytes_[scored]
    rng, stats = np.random.default_rng(seed), []
    for block in range(0, resamples, 200):  # (200, n) index draws at a time bound the memory
        idx = rng.integers(0, len(diff), (min(200, resamples - block), len(diff)))
        stats.append(diff[idx].sum(1) / weight[idx].sum(1))
    lo, hi = np.percentile(np.concatenate(stats), [2.5, 97.5])
    return {
        "bpb": round(float(diff.sum() / weight.sum()), 6),
        "ci95": [round(float(lo), 6), round(float(hi), 6)],
        "chunks": int(scored.sum()),
        "resamples": resamples,
    }


def evaluate(model, data, *, retrieval: bool, k: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """The summary of one model on one dataset (``RetroSequences`` or ``CorpusSequences``)."""
    nats, bytes_ = chunk_scores(model, data, retrieval=retrieval, k=k or data.k, batch_size=batch_size, device=device)
    return summary(nats, bytes_, chunk_leakage(data))


def evaluate_sets(retro, baseline, sets: dict, *, k: int, device: str, resamples: int = 2000) -> dict:
    """retro_on, retro_off and baseline on each named dataset, and the paired differences."""
    results = {"retro_on": {}, "retro_off": {}, "baseline": {}, "differences": {f"{a}-{b}": {} for a, b in DIFFERENCES}}
    for name, data in sets.items():
        leakage = chunk_leakage(data)
        scores = {
            "retro_on": chunk_scores(retro, data, retrieval=True, k=k, device=device),
            "retro_off": chunk_scores(retro, data, retrieval=False, k=k, device=device),
            "baseline": chunk_scores(baseline, data, retrieval=False, k=k, device=device),
        }
        for model_name, (nats, bytes_) in scores.items():
            results[model_name][name] = summary(nats, bytes_, leakage)
        for a, b in DIFFERENCES:
            results["differences"][f"{a}-{b}"][name] = paired_difference(
                scores[a][0], scores[b][0], scores[a][1], resamples=resamples
            )
        log.info("%s: %s", name, ", ".join(f"{m} {results[m][name]['bpb']:.4f}" for m in scores))
    return results


def load_run(run: str, db: str) -> tuple:
    paths = {name: os.path.join(run, name, checkpoint.CHECKPOINT) for name in ("retro", "baseline")}
    missing = [name for name, path in paths.items() if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(
            f"{run}: no {' or '.join(missing)} checkpoint ({paths[missing[0]]}); "
            f"train the run first (make train DB={db} RUN={run})"
        )
    retro, ckpt = checkpoint.load(paths["retro"])
    baseline, _ = checkpoint.load(paths["baseline"])
    return retro, baseline, checkpoint.trained_k(ckpt)


def evaluate_run(
    db: str,
    run: str,
    *,
    corpus: list[str] | None = None,
    out: str | None = None,
    k: int | None = None,
    splits=("valid", "test"),
    device: str | None = None,
    resamples: int = 2000,
    nprobe: int | None = None,
) -> dict:
    """Evaluates the run's two models on the DB's valid/test splits (stored neighbours) or on
    ``corpus`` (live retrieval), into ``out`` (default ``run``/eval.json). Top-level ``bpb`` of each
    model: the test split's, or the corpus's."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    retro, baseline, trained_k = load_run(run, db)
    k = k or trained_k
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    l, width = retro.config.max_chunks, max(k, K_LEAKAGE)
    if corpus:
        sets = {
            "corpus": CorpusSequences(
                db, corpus, chunks_per_seq=l, k=width, nprobe=nprobe, device=device, align=retro.config.align_neighbours
            )
        }
        top = "corpus"
    else:
        stored = require_stages(db)["stages"]["neighbours"]["config"].get("k_eval", width)
        if k > stored:
            raise ValueError(f"k = {k} but {db}'s tables hold {stored} neighbours per evaluation chunk")
        sets = {
            split: RetroSequences(db, split, chunks_per_seq=l, k=width, align=retro.config.align_neighbours)
            for split in splits
        }
        top = "test" if "test" in sets else splits[-1]
    results = evaluate_sets(retro, baseline, sets, k=k, device=device, resamples=resamples)
    for name in ("retro_on", "retro_off", "baseline"):  # the contract: each holds its headline bpb at top level
        results[name]["bpb"] = results[name][top]["bpb"]
    results["config"] = {
        "db": db,
        "run": run,
        "corpus": corpus or None,
        "k": k,
        "k_leakage": K_LEAKAGE,
        "alphas": list(ALPHAS),
        "resamples": resamples,
        "eos_bytes": 1,
        "align_neighbours": retro.config.align_neighbours,
    }
    if corpus:
        data = sets["corpus"]
        results["config"].update(documents=data.documents, rejected=data.rejected, copies_excluded=data.copies_dropped)
    out = out or os.path.join(run, "eval.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, out)
    return results


def table(results: dict) -> str:
    names = [n for n in results["retro_on"] if n != "bpb"]
    lines = [
        f"{'model':12s} "
        + " ".join(f"{n + ' bpb':>12s}" for n in names)
        + f"   {names[-1]} bpb(alpha), alpha = "
        + ", ".join(f"{a:g}" for a in ALPHAS)
    ]
    for model in ("retro_on", "retro_off", "baseline"):
        r = results[model]
        alphas = "  ".join(
            "   -  "
            if r[names[-1]]["bpb_by_alpha"][f"{a:g}"]["bpb"] is None
            else f"{r[names[-1]]['bpb_by_alpha'][f'{a:g}']['bpb']:.3f}"
            for a in ALPHAS
        )
        lines.append(f"{model:12s} " + " ".join(f"{r[n]['bpb']:12.4f}" for n in names) + f"   {alphas}")
    counts = results["retro_on"][names[-1]]["bpb_by_alpha"]
    lines.append(f"chunks per alpha ({names[-1]}): " + ", ".join(f"{a}: {v['chunks']}" for a, v in counts.items()))
    for diff, per_set in results["differences"].items():
        for n, d in per_set.items():
            verdict = "no difference" if d["ci95"][0] <= 0 <= d["ci95"][1] else ("lower" if d["bpb"] < 0 else "higher")
            lines.append(
                f"{diff} on {n}: {d['bpb']:+.4f} bpb, "
                f"95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] over {d['chunks']} chunks ({verdict})"
            )
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db")
    parser.add_argument("--run", default="runs/default")
    parser.add_argument(
        "--corpus", nargs="+", help="evaluate on these files/directories/globs instead of the DB's valid/test splits"
    )
    parser.add_argument("--out", help="where the JSON goes (default RUN/eval.json)")
    parser.add_argument("--k", type=int, help="neighbours per chunk given to RETRO (default: what it was trained with)")
    parser.add_argument("--nprobe", type=int, help="IVF lists searched for --corpus (default: the index's)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap draws for the intervals")
    parser.add_argument("--device")
    args = parser.parse_args()
    out = args.out or os.path.join(args.run, "eval.json")
    results = evaluate_run(
        args.db,
        args.run,
        corpus=args.corpus,
        out=out,
        k=args.k,
        device=args.device,
        resamples=args.resamples,
        nprobe=args.nprobe,
    )
    print(table(results))
    print(f"written to {out}")


if __name__ == "__main__":
    cli.run(main, "model.evaluate")
