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

Models: ``retro_on`` and ``retro_off`` (RETRO with and without its neighbours), ``retro_unrelated``
(RETRO reading the neighbours of another evaluation sequence: what it gains there is not retrieval's
content) and ``baseline`` (the decoder trained the same way without retrieval; for a RETRO-fitted
base, the base itself). A RETRO-fitted
run adds ``in_context``: In-Context RALM (Ram et al., 2023), the frozen base reading the same neighbours
as text before its context, retrieved again every chunk. Each model's ``seconds`` and ``tokens_per_s``
are its scoring time on this machine.

Intervals: for retro_on against each other model, the difference in bpb on the same chunks and its
95% percentile interval from ``resamples`` bootstrap draws of evaluation *documents* (paired: a draw
takes a document's chunks under both models; a document's chunks are correlated, so drawing chunks
would give too narrow an interval). An interval holding 0 is no difference.

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
import time
from dataclasses import replace

import numpy as np
import torch

from model import checkpoint
from model.data import CorpusSequences, RetroSequences, longest_common_run
from retro_db import cli
from retro_db.manifest import require_stages
from retro_db.tokenizer import db_tokenizer

log = logging.getLogger("model.evaluate")

ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)
K_LEAKAGE = 10  # the paper's neighbours per chunk for r(C)


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
    nats_a: np.ndarray,
    nats_b: np.ndarray,
    bytes_: np.ndarray,
    documents: np.ndarray | None = None,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """bpb(a) - bpb(b) on the same chunks, with its 95% paired bootstrap interval. A draw resamples
    ``documents`` (the document of each chunk, ``chunk_documents``) with all their chunks: chunks of one
    document are correlated, so resampling chunks alone gives intervals that are too narrow. Without
    ``documents`` every chunk is its own unit."""
    scored = bytes_ > 0
    units = np.arange(scored.sum()) if documents is None else documents[scored]
    _, unit = np.unique(units, return_inverse=True)
    diff = np.bincount(unit, (nats_a - nats_b)[scored] / math.log(2))  # (documents,)
    weight = np.bincount(unit, bytes_[scored])
    rng, stats = np.random.default_rng(seed), []
    for block in range(0, resamples, 200):  # (200, n) index draws at a time bound the memory
        idx = rng.integers(0, len(diff), (min(200, resamples - block), len(diff)))
        stats.append(diff[idx].sum(1) / weight[idx].sum(1))
    lo, hi = np.percentile(np.concatenate(stats), [2.5, 97.5])
    return {
        "bpb": round(float(diff.sum() / weight.sum()), 6),
        "ci95": [round(float(lo), 6), round(float(hi), 6)],
        "chunks": int(scored.sum()),
        "documents": len(diff),
        "resamples": resamples,
    }


@torch.no_grad()
def in_context_scores(lm, data, *, k: int, separator: list[int], device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """In-Context RALM (Ram et al., TACL 2023) on ``chunk_scores``' chunks with the same neighbours: the
    frozen Hugging Face causal LM ``lm`` reads neighbours as text before the sequence so far, retrieved
    again every chunk (stride = m). The positions that chunk u's neighbours condition in RETRO (from
    u*m + m - 1, its last token, to the next chunk's last but one) are predicted from chunk u's k rows
    [N, F], each followed by ``separator``, then the sequence's tokens up to them; the positions before
    any chunk is complete read no passage. Per evaluation chunk: nats and bytes. (n,), (n,)"""
    lm.eval().to(device)
    m, l, pad = data.m, data.l, data.pad_id
    nats, bytes_ = [], []
    for i in range(len(data)):
        x, y, neighbours, target_bytes, _ = data[i]  # (l*m,), (l*m,), (l, K, 2m), (l*m,)
        token_loss = torch.zeros(l * m)
        segments = []  # (input tokens, passage length, first position, end position)
        for s in range(l + 1):
            first, end = max(s * m - 1, 0), min((s + 1) * m - 1, l * m)
            if first >= end or not (y[first:end] != -100).any():
                continue
            rows = neighbours[s - 1, :k] if s else neighbours[:0, :0]
            passage = [t for row in rows if (row != pad).any() for t in [*row[row != pad].tolist(), *separator]]
            prefix = torch.where(x[:end] == pad, 0, x[:end]).tolist()  # padding lies after every real token
            segments.append((passage + prefix, len(passage), first, end))
        if segments:
            width = max(len(t) for t, *_ in segments)
            idx = torch.zeros(len(segments), width, dtype=torch.long)  # right-padded: causal, so never read
            for j, (tokens, *_) in enumerate(segments):
                idx[j, : len(tokens)] = torch.tensor(tokens)
            logits = lm(input_ids=idx.to(device), use_cache=False).logits.float().cpu()
            for j, (_, p, first, end) in enumerate(segments):
                token_loss[first:end] = torch.nn.functional.cross_entropy(
                    logits[j, p + first : p + end], y[first:end], ignore_index=-100, reduction="none"
                )
        nats.append(token_loss.numpy().reshape(l, m).sum(-1))
        bytes_.append(target_bytes.numpy().reshape(l, m).sum(-1))
    return np.concatenate(nats).astype(np.float64), np.concatenate(bytes_).astype(np.float64)


def evaluate(model, data, *, retrieval: bool, k: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """The summary of one model on one dataset (``RetroSequences`` or ``CorpusSequences``)."""
    nats, bytes_ = chunk_scores(model, data, retrieval=retrieval, k=k or data.k, batch_size=batch_size, device=device)
    return summary(nats, bytes_, chunk_leakage(data))


class UnrelatedNeighbours:
    """The items of ``data`` with the neighbours of the item half the set away (other documents): the
    control that tells what retrieval's content gives from what CCA does whatever it reads."""

    def __init__(self, data):
        self.data, self.l, self.m, self.pad_id = data, data.l, data.m, data.pad_id

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y, _, target_bytes, ids = self.data[i]
        return x, y, self.data[(i + len(self) // 2) % len(self)][2], target_bytes, ids


def scorers(retro, baseline, *, k: int, device: str, separator: list[int]) -> dict:
    """The models compared, each a function of a dataset to its per-chunk (nats, bytes). A RETRO-fitted
    base adds In-Context RALM with that base and the same neighbours."""
    out = {
        "retro_on": lambda d: chunk_scores(retro, d, retrieval=True, k=k, device=device),
        "retro_unrelated": lambda d: chunk_scores(retro, UnrelatedNeighbours(d), retrieval=True, k=k, device=device),
        "retro_off": lambda d: chunk_scores(retro, d, retrieval=False, k=k, device=device),
        "baseline": lambda d: chunk_scores(baseline, d, retrieval=False, k=k, device=device),
    }
    if retro.config.base:
        out["in_context"] = lambda d: in_context_scores(retro.base, d, k=k, separator=separator, device=device)
    return out


def evaluate_sets(
    retro, baseline, sets: dict, *, k: int, device: str, resamples: int = 2000, separator: list[int] = ()
) -> dict:
    """Every model of ``scorers`` on each named dataset, its inference speed, and retro_on's paired
    differences against each of the others (intervals resampling documents)."""
    models = scorers(retro, baseline, k=k, device=device, separator=list(separator))
    results = {name: {} for name in models} | {"differences": {f"retro_on-{b}": {} for b in models if b != "retro_on"}}
    for name, data in sets.items():
        leakage, documents, tokens = chunk_leakage(data), data.chunk_documents(), predicted_tokens(data)
        scores = {}
        for model_name, score in models.items():
            t0 = time.perf_counter()
            scores[model_name] = score(data)
            seconds = time.perf_counter() - t0
            results[model_name][name] = summary(*scores[model_name], leakage) | {
                "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1),
            }
        for diff in results["differences"]:
            b = diff.split("-", 1)[1]
            results["differences"][diff][name] = paired_difference(
                scores["retro_on"][0], scores[b][0], scores["retro_on"][1], documents, resamples=resamples
            )
        log.info("%s: %s", name, ", ".join(f"{m} {results[m][name]['bpb']:.4f}" for m in scores))
    return results


def passage_separator(db: str) -> list[int]:
    """What follows each neighbour's text in In-Context RALM's passages: a blank line in the DB's tokens."""
    return db_tokenizer(db).encode("\n\n", add_special_tokens=False).ids


def predicted_tokens(data) -> int:
    return int(sum(int((data[i][1] != -100).sum()) for i in range(len(data))))


def load_run(run: str, db: str) -> tuple:
    """(RETRO, its baseline, k trained with) of a run: RUN/retro and RUN/baseline of ``make train``, or of a
    RETRO-fitted base (``make retrofit``: RUN/retro alone) the base itself as the baseline."""
    retro_path = os.path.join(run, "retro", checkpoint.CHECKPOINT)
    if not os.path.exists(retro_path):
        raise FileNotFoundError(
            f"{run}: no retro checkpoint ({retro_path}); train the run first (make train DB={db} RUN={run})"
        )
    retro, ckpt = checkpoint.load(retro_path)
    if retro.config.base:
        return retro, base_alone(retro), checkpoint.trained_k(ckpt)
    baseline_path = os.path.join(run, "baseline", checkpoint.CHECKPOINT)
    if not os.path.exists(baseline_path):
        raise FileNotFoundError(
            f"{run}: no baseline checkpoint ({baseline_path}); train the run first (make train DB={db} RUN={run})"
        )
    baseline, _ = checkpoint.load(baseline_path)
    return retro, baseline, checkpoint.trained_k(ckpt)


def base_alone(retro):
    """A RETRO-fitted model's frozen base on its own, behind the same interface (no CCA, no encoder)."""
    from model.retrofit import RetroFit

    return RetroFit(retro.base, replace(retro.config, retrieval=False))


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
    separator = passage_separator(db)
    results = evaluate_sets(retro, baseline, sets, k=k, device=device, resamples=resamples, separator=separator)
    for name in (n for n in results if n != "differences"):  # the contract: each holds its headline bpb at top level
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
        "bootstrap_unit": "document",
        "in_context_separator": separator if "in_context" in results else None,
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
    models = [m for m in results if m not in ("differences", "config")]
    names = [n for n in results["retro_on"] if n != "bpb"]
    lines = [
        f"{'model':12s} "
        + " ".join(f"{n + ' bpb':>12s}" for n in names)
        + f"  {'tokens/s':>9s}   {names[-1]} bpb(alpha), alpha = "
        + ", ".join(f"{a:g}" for a in ALPHAS)
    ]
    for model in models:
        r = results[model]
        alphas = "  ".join(
            "   -  "
            if r[names[-1]]["bpb_by_alpha"][f"{a:g}"]["bpb"] is None
            else f"{r[names[-1]]['bpb_by_alpha'][f'{a:g}']['bpb']:.3f}"
            for a in ALPHAS
        )
        speed = r[names[-1]].get("tokens_per_s", float("nan"))
        lines.append(f"{model:12s} " + " ".join(f"{r[n]['bpb']:12.4f}" for n in names) + f"  {speed:9.1f}   {alphas}")
    counts = results["retro_on"][names[-1]]["bpb_by_alpha"]
    lines.append(f"chunks per alpha ({names[-1]}): " + ", ".join(f"{a}: {v['chunks']}" for a, v in counts.items()))
    for diff, per_set in results["differences"].items():
        for n, d in per_set.items():
            verdict = "no difference" if d["ci95"][0] <= 0 <= d["ci95"][1] else ("lower" if d["bpb"] < 0 else "higher")
            lines.append(
                f"{diff} on {n}: {d['bpb']:+.4f} bpb, 95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] "
                f"over {d.get('documents', d['chunks'])} documents, {d['chunks']} chunks ({verdict})"
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
