"""Growing a DB: concurrent add-documents runs take disjoint ids, increments are leakage-filtered
against the DB's valid/test documents and kept out of neighbour tables, and a run killed in any
step resumes to the bytes of an uninterrupted run."""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BEAM_TEST_ARGS, REPO


def _new_docs(tag: str) -> list[str]:
    """Documents about made-up things, so nothing in the DB resembles them."""
    return [
        f"The {tag} transfer protocol moves quibbles between two {tag}-frobnicators. "
        f"Each quibble carries a sixteen-byte "
        f"glimmer header, and a frobnicator acknowledges every third quibble with a {tag}-snark. " * 3,
        f"Configuring {tag}: set {tag.upper()}_HOME to the directory holding glimmer keys, "
        f"then run {tag}-init --snark-interval 3 "
        f"to create the frobnicator state files. The {tag} daemon rereads them on SIGHUP. " * 3,
    ]


def _write_corpus(path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _held_out_text(db: str) -> str:
    """A test document of the DB, rebuilt from its chunks, with its first word changed (a near-duplicate)."""
    from retro_db.tokenizer import load_lm_tokenizer

    table = pq.read_table(sorted(glob.glob(os.path.join(db, "chunks", "test", "*.parquet")))[0]).to_pandas()
    doc = table.groupby("doc_id").size().idxmax()
    tokens = [t for row in table[table.doc_id == doc].sort_values("chunk_index").tokens for t in row]
    text = load_lm_tokenizer(os.path.join(db, "tokenizer.json")).decode(tokens)
    return "Indeed " + text


def _add(db: str, corpus: str, name: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "add-documents",
            "--db",
            db,
            "--corpus",
            corpus,
            "--name",
            name,
            *BEAM_TEST_ARGS,
        ],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )


def _reap(proc: subprocess.Popen) -> None:
    """A SIGKILLed driver leaves the local Ray it started: its whole session goes with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def grown(db, tmp_path):
    work = str(tmp_path / "db")
    shutil.copytree(db, work)
    return work


def test_concurrent_runs_take_disjoint_ids_are_leakage_filtered_and_both_searchable(grown, tmp_path):
    from pipeline.neighbours import write_neighbours
    from retro_db.embedder import ChunkEmbedder
    from retro_db.manifest import read_manifest, write_manifest
    from retro_db.search import RetrievalIndex

    a = _write_corpus(tmp_path / "a.jsonl", _new_docs("zorblax") + [_held_out_text(grown)])
    b = _write_corpus(tmp_path / "b.jsonl", _new_docs("quuxley"))
    runs = [_add(grown, a, "a"), _add(grown, b, "b")]
    for run in runs:
        _, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-3000:]

    manifest = read_manifest(grown)
    assert not manifest.get("reservations")
    incs = {inc["name"]: inc for inc in manifest["increments"]}
    assert incs["a"]["documents"] == 2 and incs["a"]["rejected"] == {
        "rejected_leakage": 1
    }  # the near-copy of a test document
    assert incs["b"]["documents"] == 2
    docs = [set(range(incs[n]["first_doc_id"], incs[n]["first_doc_id"] + incs[n]["documents"])) for n in "ab"]
    chunk_ranges = [
        set(range(incs[n]["first_chunk_id"], incs[n]["first_chunk_id"] + incs[n]["chunks"])) for n in "ab"
    ]  # registered in either order
    assert not docs[0] & docs[1] and not chunk_ranges[0] & chunk_ranges[1]
    for inc in incs.values():  # the ids written in the shards are the reserved ones
        table = pq.read_table(glob.glob(os.path.join(grown, inc["path"], "chunks", "train", "*.parquet")))
        assert set(table["chunk_id"].to_pylist()) == set(
            range(inc["first_chunk_id"], inc["first_chunk_id"] + inc["chunks"])
        )

    index = RetrievalIndex(grown)
    nlist = faiss.extract_index_ivf(index.shards[0].index).nlist
    for tag, chunks in zip(
        ("zorblax", "quuxley"), chunk_ranges
    ):  # every list probed: the increment's own text comes first
        _, ids = index.search(
            ChunkEmbedder(threads=1).embed_texts([f"Configuring {tag}: set {tag.upper()}_HOME"]), 3, nprobe=nlist
        )
        assert int(ids[0, 0]) in chunks, (tag, ids)

    # neighbour tables leave increments out unless asked for
    first_added = min(min(c) for c in chunk_ranges)
    shutil.rmtree(os.path.join(grown, "neighbours"))
    manifest["stages"].pop("neighbours")
    write_manifest(grown, manifest)
    write_neighbours(grown)
    used = np.concatenate(
        [
            t.column("neighbour_ids").combine_chunks().values.to_numpy()
            for t in (pq.read_table(f) for f in glob.glob(os.path.join(grown, "neighbours", "*", "*.parquet")))
        ]
    )
    assert used.max() < first_added


def test_a_second_run_of_the_same_increment_is_refused_while_the_first_holds_it(grown, tmp_path):
    from pipeline.add_documents import add_documents, run_lock
    from retro_db.manifest import read_manifest

    corpus = _write_corpus(tmp_path / "d.jsonl", _new_docs("blorp"))
    with run_lock(grown, "d"):  # as a running add-documents of "d" holds it
        with pytest.raises(ValueError, match="being added by another run"):
            add_documents([corpus], grown, name="d", beam_args=BEAM_TEST_ARGS)
    assert [r["name"] for r in read_manifest(grown)["reservations"]] == ["d"] and not read_manifest(grown).get(
        "increments"
    )


def _increment_bytes(db: str, name: str) -> dict:
    """Every data file of an increment (its manifest, which holds times, aside) by sha256."""
    root = os.path.join(db, "increments", name)
    return {
        os.path.relpath(f, root): hashlib.sha256(open(f, "rb").read()).hexdigest()
        for f in glob.glob(os.path.join(root, "**", "*"), recursive=True)
        if os.path.isfile(f) and not f.endswith("manifest.json")
    }


def test_a_run_killed_in_each_step_resumes_to_the_bytes_of_an_uninterrupted_run(db, tmp_path):
    from pipeline.add_documents import add_documents
    from retro_db.manifest import read_manifest

    corpus = _write_corpus(tmp_path / "c.jsonl", _new_docs("florp"))
    reference = str(tmp_path / "reference")
    shutil.copytree(db, reference)
    expected = add_documents([corpus], reference, name="c", beam_args=BEAM_TEST_ARGS)

    killed = str(tmp_path / "killed")
    shutil.copytree(db, killed)
    for step in ("reserved", "chunks", "embeddings", "index"):  # each rerun gets one step further, then dies
        run = _add(killed, corpus, "c", env={"RETRO_FAILPOINT": f"add-documents:{step}"})
        _, err = run.communicate(timeout=900)
        _reap(run)
        assert run.returncode == -signal.SIGKILL, (step, err[-3000:])
        assert not read_manifest(killed).get("increments")  # nothing half-registered
        assert [r["name"] for r in read_manifest(killed)["reservations"]] == [
            "c"
        ]  # the ids stay reserved for the rerun
    run = _add(killed, corpus, "c")
    _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]

    (entry,) = read_manifest(killed)["increments"]
    assert {
        k: entry[k] for k in ("first_doc_id", "first_chunk_id", "documents", "chunks", "vectors", "index_shards")
    } == {k: expected[k] for k in ("first_doc_id", "first_chunk_id", "documents", "chunks", "vectors", "index_shards")}
    assert _increment_bytes(killed, "c") == _increment_bytes(reference, "c") and len(_increment_bytes(killed, "c")) >= 8
    assert not read_manifest(killed)["reservations"]
