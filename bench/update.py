"""Knowledge added after training: RETRO on held-out documents before and after their related
documents are added to the DB, and after those are deleted again.

    python -m bench.update [--pair llvm|clang] [--seeds 0 1 2] [--build-args ...] [--train-args ...]
    # make bench-update

Corpora (Debian packages pinned by sha256, like the bundled corpus): the reStructuredText sources of
LLVM's documentation in two versions, ``llvm-14-doc`` and ``llvm-15-doc``, or (``--pair clang``, the
second pair) Clang's, ``clang-14-doc`` and ``clang-15-doc``. Of the source files both
versions have, ``--held-out`` files (a seeded draw) are held out; ``--files`` of the rest make
corpus A (both versions of each). B = the version-14 text of the held-out files, E = the sections
of their version-15 text that changed (an unchanged section is B's own document, which evaluation
excludes as identical; most sections do not change between these versions). Every file is split into
documents at its top three heading levels (``pipeline.default_corpus.split_rst_sections``).

The run: ``build-db`` on A with the defaults (plus ``--build-args``); for each seed ``model.train``
RETRO and the baseline (``--train-args``; ``--retrofit-baseline``: RETRO trained on the frozen baseline,
``--retro-args`` for RETRO alone), or with ``--base`` one RETRO-fit of that pretrained base (``make
retrofit``'s defaults), whose baseline is the base itself and beside which In-Context RALM is scored with
the same neighbours; E evaluated with neighbours retrieved live (``model.data
.CorpusSequences``); ``add-documents`` B; E again; B's documents deleted (``retro_db.deletions``); E
again. Reported per seed: the baseline's bpb, RETRO's with A, with A+B and after the delete, the
paired differences with 95% bootstrap intervals over E's documents, and bpb(alpha) with A+B.
``--single-version``: A holds one version of its files (the pair whose training DB rarely holds a
chunk's continuation).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import zstandard

from bench.debian_packages import pinned_package_root
from model import base_lm
from model.data import CorpusSequences
from model.evaluate import (
    K_LEAKAGE,
    bpb,
    chunk_leakage,
    load_run,
    paired_difference,
    passage_separator,
    predicted_tokens,
    scorers,
    summary,
)
from pipeline.default_corpus import split_rst_sections
from retro_db import deletions, layout
from retro_db.corpus import normalize_text
from retro_db.manifest import db_roots
from retro_db.token_store import TokenStore

log = logging.getLogger("bench.update")

PAIRS = {  # Debian bookworm: version -> (apt spec, sha256 of the .deb, the reStructuredText sources inside it)
    "llvm": {
        14: (
            "llvm-14-doc=1:14.0.6-12",
            "d83d576ccf39dd9c698f983677f5569284cb4d55f084dd135859a73d31910b1a",
            "usr/share/doc/llvm-14-doc/html/_sources",
        ),
        15: (
            "llvm-15-doc=1:15.0.6-4",
            "613d2f6c303411508b28775269d4f6c35498905d0f3e2dd39f862191a1faf564",
            "usr/share/doc/llvm-15-doc/html/_sources",
        ),
    },
    "clang": {
        14: (
            "clang-14-doc=1:14.0.6-12",
            "9d4160c5cdb3e240fc676eacba163481002363f9532f854bc09e3eb566eb5c0f",
            "usr/share/doc/clang-14/html/_sources",
        ),
        15: (
            "clang-15-doc=1:15.0.6-4",
            "6090efd4128984a1abf423a7827e4c4f9f342e2f90fc8b1dcca0dc49eabe653d",
            "usr/share/doc/clang-15/html/_sources",
        ),
    },
}

MODELS = ("retro", "baseline", "in_context")  # what score() can run (retro_off is not compared here)

# (files whose two versions make A, files held out) by default: llvm has 341 files both versions hold, clang 80
SIZES = {"llvm": (60, 120), "clang": (38, 40)}


def fetch_sources(work: Path, packages: dict) -> dict[int, Path]:
    """Each version's ``_sources`` folder, from its .deb (downloaded once, sha256 checked every time)."""
    out = {}
    for version, (spec, sha256, sources) in packages.items():
        root = pinned_package_root(work / "src" / spec.split("=")[0], spec, sha256)
        out[version] = root / sources
    return out


def write_corpora(
    sources: dict[int, Path],
    packages: dict,
    out: Path,
    *,
    files: int,
    held_out: int,
    seed: int = 0,
    single_version: bool = False,
) -> dict[str, Path]:
    """A, B and E as JSONL.zst (deterministic bytes for the same packages and arguments). ``single_version``:
    A holds only the version-15 text of its files, so no training document has another version in the DB."""
    common = sorted(
        p.relative_to(sources[14]).as_posix()
        for p in sources[14].rglob("*.rst.txt")
        if (sources[15] / p.relative_to(sources[14])).exists()
    )
    random.Random(seed).shuffle(common)
    held, kept = sorted(common[:held_out]), sorted(common[held_out : held_out + files])
    out.mkdir(parents=True, exist_ok=True)
    sections = {
        (rel, v): split_rst_sections((sources[v] / rel).read_text(encoding="utf-8"))
        for rel in held + kept
        for v in (14, 15)
    }
    # E holds only sections that changed between the versions: an unchanged one is B's document itself,
    # whose neighbours evaluation excludes (an identical document is the answer, not related knowledge)
    old_texts = {normalize_text(text) for rel in held for _, text in sections[(rel, 14)]}
    paths = {}
    a_versions = (15,) if single_version else (14, 15)
    for name, names, versions in (("A", kept, a_versions), ("B", held, (14,)), ("E", held, (15,))):
        buf = io.StringIO()
        for rel in names:
            for version in versions:
                for title, text in sections[(rel, version)]:
                    if name == "E" and normalize_text(text) in old_texts:
                        continue
                    meta = {"source": f"{packages[version][0]}: {rel}", "title": title}
                    buf.write(json.dumps({"text": text, "meta": meta}, ensure_ascii=False, sort_keys=True) + "\n")
        paths[name] = out / f"{name}.jsonl.zst"
        paths[name].write_bytes(zstandard.ZstdCompressor(level=19, threads=0).compress(buf.getvalue().encode("utf-8")))
    return paths


def run(args: list[str]) -> None:
    log.info("%s", " ".join(args))
    subprocess.run([sys.executable, *args], check=True)


def score(db: str, run_dir: str, corpus: Path, models: tuple[str, ...] = MODELS) -> dict:
    """Per-chunk losses on ``corpus``, retrieved live now, of ``models``: RETRO (retrieval on), the baseline
    and, for a RETRO-fitted base, In-Context RALM with the same neighbours; each model's scoring seconds."""
    retro, baseline, k = load_run(run_dir, db)
    data = CorpusSequences(
        db,
        [str(corpus)],
        chunks_per_seq=retro.config.max_chunks,
        k=max(k, K_LEAKAGE),
        align=retro.config.align_neighbours,
    )
    separator = passage_separator(db)
    out = {"leakage": chunk_leakage(data), "documents": data.chunk_documents(), "tokens": predicted_tokens(data)}
    for name, scorer in scorers(retro, baseline, k=k, device="cpu", separator=separator).items():
        name = "retro" if name == "retro_on" else name
        if name in models:
            t0 = time.perf_counter()
            out[name], out["bytes"] = scorer(data)
            out[f"{name}_seconds"] = time.perf_counter() - t0
    return out


def report(scores: dict[int, dict[str, dict]]) -> dict:
    rows = {}
    for seed, by_db in scores.items():
        a, ab, deleted = by_db["A"], by_db["A+B"], by_db["deleted"]

        def diff(x: dict, x_model: str, y: dict, y_model: str) -> dict:
            return paired_difference(x[x_model], y[y_model], x["bytes"], x["documents"])

        rows[seed] = {
            "baseline": bpb(a["baseline"], a["bytes"]),
            "retro_A": bpb(a["retro"], a["bytes"]),
            "retro_AB": bpb(ab["retro"], ab["bytes"]),
            "retro_deleted": bpb(deleted["retro"], deleted["bytes"]),
            "AB-A": diff(ab, "retro", a, "retro"),
            "AB-baseline": diff(ab, "retro", a, "baseline"),  # the baseline reads no DB: scored once
            "A-baseline": diff(a, "retro", a, "baseline"),
            "by_alpha_AB": summary(ab["retro"], ab["bytes"], ab["leakage"])["bpb_by_alpha"],
            "by_alpha_A": summary(a["retro"], a["bytes"], a["leakage"])["bpb_by_alpha"],
            "tokens_per_s": {m: x["tokens"] / x[f"{m}_seconds"] for x in (a, ab) for m in MODELS if m in x},
        }
        if "in_context" in ab:
            rows[seed] |= {
                "in_context_AB": bpb(ab["in_context"], ab["bytes"]),
                "AB-in_context": diff(ab, "retro", ab, "in_context"),
            }
    return rows


def table(rows: dict) -> str:
    fit = all("in_context_AB" in r for r in rows.values())
    lines = [
        "| seed | baseline | RETRO, DB A | RETRO, A+B | after deleting B | "
        "A+B vs A (95% CI) | A+B vs baseline (95% CI) | A vs baseline (95% CI) |"
        + (" In-Context RALM, A+B | RETRO vs In-Context, A+B (95% CI) | tokens/s RETRO / In-Context |" * fit),
        "|---|---|---|---|---|---|---|---|" + "---|---|---|" * fit,
    ]
    for seed, r in rows.items():
        ci = lambda d: f"{d['bpb']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"  # noqa: E731
        line = (
            f"| {seed} | {r['baseline']:.4f} | {r['retro_A']:.4f} | {r['retro_AB']:.4f} | {r['retro_deleted']:.4f} | "
            f"{ci(r['AB-A'])} ({r['retro_AB'] / r['retro_A'] - 1:+.1%}) | "
            f"{ci(r['AB-baseline'])} ({r['retro_AB'] / r['baseline'] - 1:+.1%}) | {ci(r['A-baseline'])} |"
        )
        if fit:
            speed = r["tokens_per_s"]
            line += (
                f" {r['in_context_AB']:.4f} | {ci(r['AB-in_context'])} | "
                f"{speed['retro']:.0f} / {speed['in_context']:.0f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=sorted(PAIRS), default="llvm", help="the two documentation versions")
    parser.add_argument("--work", type=Path, help="default: bench/out/update (llvm), bench/out/update-<pair> (others)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--files", type=int, help="source files whose two versions make corpus A (default: SIZES)")
    parser.add_argument(
        "--held-out",
        type=int,
        help="source files held out: version 14 is B, their changed version-15 sections E (default: SIZES)",
    )
    parser.add_argument(
        "--base",
        help="RETRO-fit this pretrained base (a model directory, a .gguf file or smollm2-135m) instead of training "
        "RETRO and a baseline: the DB is chunked with its tokenizer, the baseline is the base itself, and "
        "In-Context RALM with the same neighbours is scored beside it",
    )
    parser.add_argument(
        "--retrofit-baseline",
        action="store_true",
        help="without --base: RETRO is each seed's baseline, frozen, with a neighbour encoder and CCA trained on it "
        "(model.train --retrofit), so that a chunk without neighbours gets the baseline's logits",
    )
    parser.add_argument(
        "--single-version",
        action="store_true",
        help="A holds one version (15) of its files: no training document has another version in the DB",
    )
    parser.add_argument(
        "--build-args", default="", help="extra flags for build-db (default: none, what `make build-db` runs)"
    )
    parser.add_argument(
        "--train-args",
        default="",
        help="extra flags for model.train (default: none, what `make train` or, with --base, `make retrofit` runs)",
    )
    parser.add_argument("--retro-args", default="", help="extra flags for RETRO's model.train only, after --train-args")
    args = parser.parse_args()
    if args.base and args.retrofit_baseline:
        parser.error("--retrofit-baseline is for the from-scratch models; --base RETRO-fits a pretrained one")
    suffix = ("" if args.pair == "llvm" else f"-{args.pair}") + ("-single" if args.single_version else "")
    work = args.work or Path("bench/out/update" + suffix + ("-retrofit" if args.base else ""))
    packages = PAIRS[args.pair]
    files, held_out = (given or default for given, default in zip((args.files, args.held_out), SIZES[args.pair]))
    corpora = write_corpora(
        fetch_sources(work, packages),
        packages,
        work / "corpora",
        files=files,
        held_out=held_out,
        single_version=args.single_version,
    )
    for name, path in corpora.items():
        log.info("corpus %s: %s sha256 %s", name, path, hashlib.sha256(path.read_bytes()).hexdigest())
    db = str(work / "db")
    shutil.rmtree(db, ignore_errors=True)  # the run adds and deletes documents: always from a fresh A
    shutil.rmtree(work / "runs", ignore_errors=True)  # and checkpoints of another DB must not be resumed
    tokenizer = ["--tokenizer", base_lm.resolve(args.base)] if args.base else []
    run(["-m", "pipeline", "build-db", "--corpus", str(corpora["A"]), "--db", db, *tokenizer, *args.build_args.split()])
    runs = {seed: str(work / "runs" / f"seed{seed}") for seed in args.seeds}
    models = [("retro", ["--base", args.base])] if args.base else [("baseline", ["--baseline"]), ("retro", [])]
    for seed, run_dir in runs.items():
        for name, flags in models:
            out = f"{run_dir}/{name}"
            if name == "retro":
                frozen = ["--retrofit", f"{run_dir}/baseline/ckpt.pt"] if args.retrofit_baseline else []
                flags = [*flags, *frozen, *args.retro_args.split()]
            run(["-m", "model.train", "--db", db, "--out", out, "--seed", str(seed), *args.train_args.split(), *flags])
    scores = {seed: {"A": score(db, run_dir, corpora["E"], ("retro", "baseline"))} for seed, run_dir in runs.items()}
    run(["-m", "pipeline", "add-documents", "--corpus", str(corpora["B"]), "--db", db, "--name", "B"])
    for seed, run_dir in runs.items():
        scores[seed]["A+B"] = score(db, run_dir, corpora["E"], ("retro", "in_context"))
    added = [
        d
        for f in layout.document_shard_files(db_roots(db)[-1])
        for d in pq.read_table(f, columns=["doc_id"])["doc_id"].to_pylist()
    ]
    deletions.delete_documents(db, added, TokenStore(db), reason="bench.update: B removed", actor="bench.update")
    for seed, run_dir in runs.items():
        scores[seed]["deleted"] = score(db, run_dir, corpora["E"], ("retro",))
    rows = report(scores)
    (work / "update.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "seeds": rows}, indent=1)
    )
    print(table(rows))
    for seed, r in rows.items():
        print(
            f"seed {seed}: after deleting B, |bpb - bpb with A| = {abs(r['retro_deleted'] - r['retro_A']):.2e}; "
            f"E chunks with r(C) <= 0.125 against A+B: "
            f"{r['by_alpha_AB']['0.125']['chunks']} of {r['by_alpha_AB']['1']['chunks']}"
        )


if __name__ == "__main__":
    main()
