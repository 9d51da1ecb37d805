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
RETRO and the baseline (``--train-args``); E evaluated with neighbours retrieved live (``model.data
.CorpusSequences``); ``add-documents`` B; E again; B's documents deleted (``retro_db.deletions``); E
again. Reported per seed: the baseline's bpb, RETRO's with A, with A+B and after the delete, the
paired differences with 95% bootstrap intervals over E's chunks, and bpb(alpha) with A+B.
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
from pathlib import Path

import pyarrow.parquet as pq
import zstandard

from bench.debian_packages import pinned_package_root
from model.data import CorpusSequences
from model.evaluate import K_LEAKAGE, bpb, chunk_leakage, chunk_scores, load_run, paired_difference, summary
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
    sources: dict[int, Path], packages: dict, out: Path, *, files: int, held_out: int, seed: int = 0
) -> dict[str, Path]:
    """A, B and E as JSONL.zst (deterministic bytes for the same packages and arguments)."""
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
    for name, names, versions in (("A", kept, (14, 15)), ("B", held, (14,)), ("E", held, (15,))):
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


def score(db: str, run_dir: str, corpus: Path) -> dict:
    """Per-chunk losses of RETRO (retrieval on) and the baseline on ``corpus``, retrieved live now."""
    retro, baseline, k = load_run(run_dir, db)
    data = CorpusSequences(
        db,
        [str(corpus)],
        chunks_per_seq=retro.config.max_chunks,
        k=max(k, K_LEAKAGE),
        align=retro.config.align_neighbours,
    )
    on, bytes_ = chunk_scores(retro, data, retrieval=True, k=k)
    base, _ = chunk_scores(baseline, data, retrieval=False, k=k)
    return {"retro": on, "baseline": base, "bytes": bytes_, "leakage": chunk_leakage(data)}


def report(scores: dict[int, dict[str, dict]]) -> dict:
    rows = {}
    for seed, by_db in scores.items():
        a, ab, deleted = by_db["A"], by_db["A+B"], by_db["deleted"]
        rows[seed] = {
            "baseline": bpb(a["baseline"], a["bytes"]),
            "retro_A": bpb(a["retro"], a["bytes"]),
            "retro_AB": bpb(ab["retro"], ab["bytes"]),
            "retro_deleted": bpb(deleted["retro"], deleted["bytes"]),
            "AB-A": paired_difference(ab["retro"], a["retro"], a["bytes"]),
            "AB-baseline": paired_difference(ab["retro"], a["baseline"], a["bytes"]),
            "A-baseline": paired_difference(a["retro"], a["baseline"], a["bytes"]),
            "by_alpha_AB": summary(ab["retro"], ab["bytes"], ab["leakage"])["bpb_by_alpha"],
            "by_alpha_A": summary(a["retro"], a["bytes"], a["leakage"])["bpb_by_alpha"],
        }
    return rows


def table(rows: dict) -> str:
    lines = [
        (
            "| seed | baseline | RETRO, DB A | RETRO, A+B | after deleting B | "
            "A+B vs A (95% CI) | A+B vs baseline (95% CI) | gain vs A |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, r in rows.items():
        ci = lambda d: f"{d['bpb']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"  # noqa: E731
        lines.append(
            f"| {seed} | {r['baseline']:.4f} | {r['retro_A']:.4f} | {r['retro_AB']:.4f} | {r['retro_deleted']:.4f} | "
            f"{ci(r['AB-A'])} | {ci(r['AB-baseline'])} | {1 - r['retro_AB'] / r['retro_A']:.1%} |"
        )
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
        "--build-args", default="", help="extra flags for build-db (default: none, what `make build-db` runs)"
    )
    parser.add_argument(
        "--train-args", default="", help="extra flags for model.train (default: none, what `make train` runs)"
    )
    args = parser.parse_args()
    work = args.work or Path("bench/out/update" + ("" if args.pair == "llvm" else f"-{args.pair}"))
    packages = PAIRS[args.pair]
    files, held_out = (given or default for given, default in zip((args.files, args.held_out), SIZES[args.pair]))
    corpora = write_corpora(fetch_sources(work, packages), packages, work / "corpora", files=files, held_out=held_out)
    for name, path in corpora.items():
        log.info("corpus %s: %s sha256 %s", name, path, hashlib.sha256(path.read_bytes()).hexdigest())
    db = str(work / "db")
    shutil.rmtree(db, ignore_errors=True)  # the run adds and deletes documents: always from a fresh A
    shutil.rmtree(work / "runs", ignore_errors=True)  # and checkpoints of another DB must not be resumed
    run(["-m", "pipeline", "build-db", "--corpus", str(corpora["A"]), "--db", db, *args.build_args.split()])
    runs = {seed: str(work / "runs" / f"seed{seed}") for seed in args.seeds}
    for seed, run_dir in runs.items():
        for flags in (["--baseline"], []):
            name = "baseline" if flags else "retro"
            run(
                [
                    "-m",
                    "model.train",
                    "--db",
                    db,
                    "--out",
                    f"{run_dir}/{name}",
                    "--seed",
                    str(seed),
                    *flags,
                    *args.train_args.split(),
                ]
            )
    scores = {seed: {"A": score(db, run_dir, corpora["E"])} for seed, run_dir in runs.items()}
    run(["-m", "pipeline", "add-documents", "--corpus", str(corpora["B"]), "--db", db, "--name", "B"])
    for seed, run_dir in runs.items():
        scores[seed]["A+B"] = score(db, run_dir, corpora["E"])
    added = [
        d
        for f in layout.document_shard_files(db_roots(db)[-1])
        for d in pq.read_table(f, columns=["doc_id"])["doc_id"].to_pylist()
    ]
    deletions.delete_documents(db, added, TokenStore(db), reason="bench.update: B removed", actor="bench.update")
    for seed, run_dir in runs.items():
        scores[seed]["deleted"] = score(db, run_dir, corpora["E"])
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
