"""Stage 1 end to end and its transforms: dedup, leakage, dense ids, dead letters, reruns."""

import glob
import hashlib
import json
import os
import shutil

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from conftest import BEAM_TEST_ARGS, write_mixed_corpus
from pipeline import chunk_pipeline as cp
from pipeline import minhash
from pipeline.lm_tokenizer import train_lm_tokenizer
from pipeline.stage import ConfigMismatch
from retro_db.corpus import document_key, normalize_text
from retro_db.manifest import read_manifest
from retro_db.tokenizer import EOS, load_lm_tokenizer


@pytest.fixture(scope="module")
def tokenizer(corpus_docs):
    return train_lm_tokenizer((d["text"] for d in corpus_docs[:300]), vocab_size=2048)


def test_tokenizer_training_is_deterministic(corpus_docs, tokenizer):
    again = train_lm_tokenizer((d["text"] for d in corpus_docs[:300]), vocab_size=2048)
    assert again.to_str() == tokenizer.to_str()
    text = corpus_docs[5]["text"]
    assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level BPE is lossless


def tokenized_doc(tokenizer, text, split="train", source="s", position=0):
    return {
        "key": hashlib.blake2b(text.encode(), digest_size=16).digest(),
        "split": split,
        "source": source,
        "position": position,
        "meta": "",
        "tokens": np.array(tokenizer.encode(text).ids, dtype=np.uint32).tobytes(),
    }


def perturb(tokens, fraction, rng):
    out = np.frombuffer(tokens, dtype=np.uint32).copy()
    idx = rng.choice(len(out), size=max(1, int(len(out) * fraction)), replace=False)
    out[idx] = rng.integers(0, 2048, size=len(idx))
    return out.tobytes()


def run_dedup(docs, config):
    """(sources of the documents kept for training/evaluation, [(source, reason)] of the others: rejected, or
    "retrieval" for duplicates of train documents kept as retrieval-only)."""
    with TestPipeline(argv=BEAM_TEST_ARGS) as p:
        out = p | beam.Create(docs) | cp.Deduplicate(config)
        kept = (
            out["kept"]
            | "Kept" >> beam.Filter(lambda d: d["split"] != "retrieval")
            | "KeptSources" >> beam.Map(lambda d: d["source"])
        )
        moved = (
            out["kept"]
            | "Moved" >> beam.Filter(lambda d: d["split"] == "retrieval")
            | "MovedSources" >> beam.Map(lambda d: (d["source"], "retrieval"))
        )
        dropped = (
            (out["rejected"] | "DroppedSources" >> beam.Map(lambda r: (r.source, r.reason))),
            moved,
        ) | beam.Flatten()
        kept | "WriteKept" >> beam.io.WriteToText("/tmp/_dedup_kept", shard_name_template="")
        dropped | "WriteDropped" >> beam.io.WriteToText("/tmp/_dedup_dropped", shard_name_template="")
    kept = open("/tmp/_dedup_kept").read().split()
    dropped = [eval(line) for line in open("/tmp/_dedup_dropped").read().splitlines()]
    return kept, dropped


def test_minhash_lsh_removes_planted_near_duplicates_and_keeps_unrelated(corpus_docs, tokenizer):
    """>= 95% of planted near-duplicates (5-gram Jaccard >= 0.9) removed, >= 99% of originals kept."""
    rng = np.random.default_rng(0)
    originals = [tokenized_doc(tokenizer, d["text"], source=f"orig-{i}") for i, d in enumerate(corpus_docs)]
    long_ones = [d for d in originals if len(cp.doc_tokens(d)) >= 150]
    planted = []
    for i, doc in enumerate(long_ones[:200]):
        tokens = perturb(doc["tokens"], 0.008, rng)
        if minhash.exact_jaccard(cp.doc_tokens(doc), np.frombuffer(tokens, dtype=np.uint32), 5) >= 0.9:
            planted.append(
                {
                    **doc,
                    "key": hashlib.blake2b(tokens, digest_size=16).digest(),
                    "tokens": tokens,
                    "source": f"copy-{i}",
                    "of": doc["source"],
                }
            )
    assert len(planted) >= 100
    kept, dropped = run_dedup(originals + planted, cp.ChunkConfig())
    kept_set = set(kept)
    # a planted copy may win over its original (smaller key): a pair is resolved when one survives
    pairs_resolved = sum(1 for p in planted if (p["source"] in kept_set) != (p["of"] in kept_set))
    stand_in = {p["of"] for p in planted if p["source"] in kept_set}
    originals_kept = sum(1 for d in originals if d["source"] in kept_set or d["source"] in stand_in)
    assert pairs_resolved / len(planted) >= 0.95, (pairs_resolved, len(planted))
    assert originals_kept / len(originals) >= 0.99, (originals_kept, len(originals))
    assert all(reason == "retrieval" for _, reason in dropped)  # train near-duplicates stay retrievable
    assert len(kept) + len(dropped) == len(originals) + len(planted)


def test_leakage_drops_train_documents_close_to_held_out_ones(corpus_docs, tokenizer):
    rng = np.random.default_rng(1)
    base = [
        tokenized_doc(tokenizer, d["text"], source=f"doc-{i}")
        for i, d in enumerate(corpus_docs[:80])
        if len(d["text"]) > 800
    ]
    held_out = [dict(d, split="test") for d in base[:10]]
    leaked = [
        dict(
            d,
            split="train",
            source=d["source"] + "-leak",
            tokens=perturb(d["tokens"], 0.004, rng),
            key=hashlib.blake2b(d["source"].encode(), digest_size=16).digest(),
        )
        for d in held_out
    ]
    clean = base[10:]
    kept, dropped = run_dedup(held_out + leaked + clean, cp.ChunkConfig())
    assert sorted(s for s, _ in dropped) == sorted(d["source"] for d in leaked)
    assert {r for _, r in dropped} == {cp.LEAKAGE}
    assert set(kept) == {d["source"] for d in held_out + clean}


def boilerplate_bucket(n, planted, rng):
    """``n`` documents' signatures that all share LSH band 0 (as documents sharing boilerplate do) and nothing
    else, and ``planted`` pairs among them that agree on 113 of 128 rows (estimated Jaccard 0.88) but differ in
    one row of every other band: the large bucket is the only one each pair shares. (n, 128) uint32, pairs"""
    sigs = rng.integers(0, 2**32, size=(n, 128), dtype=np.uint32)
    sigs[:, :8] = rng.integers(0, 2**32, size=8, dtype=np.uint32)
    pairs = rng.choice(n, size=(planted, 2), replace=False)
    for a, b in pairs:
        sigs[b] = sigs[a]
        rows = 8 * np.arange(1, 16) + rng.integers(0, 8, size=15)
        sigs[b, rows] = rng.integers(0, 2**32, size=15, dtype=np.uint32)
    return sigs, pairs


def find_pairs(docs, mode, config, out):
    """FindNearDuplicates' pairs and the largest group one Verify call was handed; checks that every pair
    counted where it was verified (a Beam counter) reached the end (the data's own count), and that the
    matches are counted, one per matched document."""
    p = beam.Pipeline(argv=BEAM_TEST_ARGS)
    found = p | beam.Create(docs) | cp.FindNearDuplicates(config, mode)
    (
        found["matches"]
        | beam.Map(lambda kv: f"{kv[0].hex()} {kv[1].hex()}")
        | "WritePairs" >> beam.io.WriteToText(str(out / "pairs"), shard_name_template="")
    )
    found["counts"] | beam.Map(json.dumps) | "WriteCounts" >> beam.io.WriteToText(str(out / "counts"))
    result = p.run()
    result.wait_until_finish()
    tile = result.metrics().query(MetricsFilter().with_name(f"{mode}_members_held"))["distributions"]
    pairs = {tuple(bytes.fromhex(k) for k in line.split()) for line in open(out / "pairs").read().splitlines()}
    counts = dict(json.loads(line) for f in out.glob("counts*") for line in open(f))
    verified = cp.pair_counters(result)[f"{mode}_{cp.PAIRS_VERIFIED}"]
    assert counts == {f"{mode}_{cp.PAIRS_ARRIVED}": verified, f"{mode}_{cp.MATCHES}": len(pairs)}, (counts, verified)
    assert verified >= len(pairs) > 0
    return pairs, max(d.committed.max for d in tile)


@pytest.mark.parametrize("n", [5000, 10000])
def test_every_near_duplicate_and_leak_in_a_large_bucket_is_found_with_bounded_groups(n, tmp_path):
    """Pairs whose one shared bucket holds thousands of boilerplate-sharing documents are all found (a window of
    the 64 neighbours in key order found none of the near-duplicates here, nor the leaks of held-out documents
    past the bucket's first 64), documents sharing only the boilerplate are not matched, and no Verify call holds
    more than about two blocks, whatever the bucket's size."""
    rng = np.random.default_rng(n)
    config = cp.ChunkConfig()
    keys = [rng.bytes(16) for _ in range(n)]
    dedup_sigs, near = boilerplate_bucket(n, 20, rng)
    leakage_sigs, leaks = boilerplate_bucket(n, 30, rng)
    splits = rng.choice(["train", "valid", "test"], p=[0.94, 0.03, 0.03], size=n).astype(object)
    splits[leaks[:20, 0]] = rng.choice(["valid", "test"], size=20)  # train-held-out pairs: leaks
    splits[leaks[:20, 1]] = "train"
    splits[leaks[20:25]] = "valid"  # two held-out documents: no leak; the last five: two train ones, no leak either
    splits[leaks[25:]] = "train"
    docs = [
        {
            "key": keys[i],
            "split": splits[i],
            "dedup_sig": dedup_sigs[i].tobytes(),
            "leakage_sig": leakage_sigs[i].tobytes(),
        }
        for i in range(n)
    ]
    train = splits == "train"
    found, largest = find_pairs([d for d, t in zip(docs, train) if t], "dedup", config, tmp_path / "dedup")
    assert found == {tuple(sorted((keys[a], keys[b]), reverse=True)) for a, b in near if train[a] and train[b]}
    assert largest <= 2.3 * config.bucket_block
    found, largest = find_pairs(docs, "leakage", config, tmp_path / "leakage")
    assert found == {(keys[b], keys[a]) for a, b in leaks[:20]}
    assert largest <= 2.3 * config.bucket_block


def test_matching_pairs_agree_with_the_estimated_jaccard_of_every_pair():
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 3, size=(150, 128), dtype=np.uint32)  # three values: matches spread around 1/3
    for threshold in (0.3, 0.34, 0.4):
        expected = {
            (a, b)
            for a in range(150)
            for b in range(a + 1, 150)
            if minhash.estimated_jaccard(sigs[a], sigs[b]) >= threshold
        }
        assert 0 < len(expected) < 150 * 149 / 2
        assert {tuple(x) for x in cp.matching_pairs(sigs, sigs, threshold, same=True).tolist()} == expected
        cross = {(a, b) for a in range(100) for b in range(100, 150) if (a, b) in expected}
        got = cp.matching_pairs(sigs[:100], sigs[100:], threshold, same=False)
        assert {(a, b + 100) for a, b in got.tolist()} == cross


def test_tiles_put_every_pair_of_a_bucket_in_exactly_one_tile():
    """Each tile (i, j) compares block i with block j (i < j) or block i with itself: every pair once."""
    keys = [bytes([i, 7]) for i in range(60)]
    placed = {k: cp.tiles_of(b"band", k, 4) for k in keys}
    tiles = {}
    for k, (block, its_tiles) in placed.items():
        for t in its_tiles:
            tiles.setdefault(t, []).append((block, k))
    compared = []
    for (i, j), members in tiles.items():
        left = [k for b, k in members if b == i]
        right = [k for b, k in members if b == j]
        compared += [tuple(sorted((x, y))) for x in left for y in right if i != j or x < y]
    assert sorted(compared) == sorted((x, y) for x in keys for y in keys if x < y)
    assert len({b for b, _ in placed.values()}) == 4


def test_exact_dedup_keeps_the_first_occurrence():
    docs = [
        {"key": b"k1", "source": "b", "position": 1},
        {"key": b"k1", "source": "a", "position": 7},
        {"key": b"k2", "source": "c", "position": 0},
    ]
    with TestPipeline(argv=BEAM_TEST_ARGS) as p:
        out = p | beam.Create(docs) | cp.ExactDedup()
        assert_that(
            out["kept"] | beam.Map(lambda d: (d["source"], d["position"])), equal_to([("a", 7), ("c", 0)]), label="kept"
        )
        assert_that(
            out["rejected"] | beam.Map(lambda r: (r.source, r.reason, r.detail)),
            equal_to([("b", cp.EXACT_DUPLICATE, "same text as a:7")]),
            label="dropped",
        )


def test_exact_dedup_with_copies_kept_carries_them_on_the_first_occurrence():
    docs = [
        {"key": b"k1", "source": "b", "position": 1, "meta": "m"},
        {"key": b"k1", "source": "a", "position": 7, "meta": ""},
        {"key": b"k2", "source": "c", "position": 0, "meta": ""},
    ]
    with TestPipeline(argv=BEAM_TEST_ARGS) as p:
        out = p | beam.Create(docs) | cp.ExactDedup(keep_copies=True)
        assert_that(
            out["kept"] | beam.Map(lambda d: (d["source"], d["position"], d["copies"])),
            equal_to([("a", 7, [("b", 1, "m")]), ("c", 0, [])]),
            label="kept",
        )
        assert_that(out["rejected"], equal_to([]), label="dropped")


def test_duplicates_of_train_documents_become_retrieval_only_and_of_held_out_ones_are_rejected(corpus_docs, tokenizer):
    """The fate of every kind of duplicate, from documents whose splits and relations are set by hand."""
    rng = np.random.default_rng(2)
    base = [
        tokenized_doc(tokenizer, d["text"], source=f"doc-{i}")
        for i, d in enumerate(corpus_docs[:80])
        if len(d["text"]) > 800
    ][:8]
    x, v, leak_target = dict(base[0], split="train"), dict(base[1], split="valid"), dict(base[2], split="test")
    x["copies"], v["copies"] = [("x-copy", 3, "")], [("v-copy", 0, "")]
    # near-duplicates get the largest keys, so they (not their originals) are the ones marked
    near_x = dict(
        x, source="x-near", key=b"\xff" * 16, tokens=perturb(x["tokens"], 0.004, rng), copies=[("x-near-copy", 0, "")]
    )
    near_v = dict(v, source="v-near", key=b"\xfe" * 16, tokens=perturb(v["tokens"], 0.004, rng), copies=[])
    leaked = dict(
        leak_target,
        split="train",
        source="leaked",
        key=b"\x00" * 16,
        tokens=perturb(leak_target["tokens"], 0.004, rng),
        copies=[("leaked-copy", 0, "")],
    )
    others = [dict(d, split="train") for d in base[3:]]
    with TestPipeline(argv=BEAM_TEST_ARGS) as p:
        out = p | beam.Create([x, v, leak_target, near_x, near_v, leaked, *others]) | cp.Deduplicate(cp.ChunkConfig())
        assert_that(
            out["kept"] | beam.Map(lambda d: (d["source"], d["position"], d["split"], "copies" in d)),
            equal_to(
                [
                    (x["source"], 0, "train", False),
                    ("x-copy", 3, "retrieval", False),
                    ("x-near", 0, "retrieval", False),
                    ("x-near-copy", 0, "retrieval", False),
                    (v["source"], 0, "valid", False),
                    (leak_target["source"], 0, "test", False),
                ]
                + [(d["source"], 0, "train", False) for d in others]
            ),
            label="kept",
        )
        assert_that(
            out["rejected"] | beam.Map(lambda r: (r.source, r.reason)),
            equal_to(
                [
                    ("v-copy", cp.EXACT_DUPLICATE),
                    ("v-near", cp.NEAR_DUPLICATE),
                    ("leaked", cp.LEAKAGE),
                    ("leaked-copy", cp.LEAKAGE),
                ]
            ),
            label="rejected",
        )
        # a retrieval-only copy is its original's text: same key and tokens
        copies = (
            out["kept"] | beam.Filter(lambda d: d["source"] == "x-copy") | beam.Map(lambda d: (d["key"], d["tokens"]))
        )
        assert_that(copies, equal_to([(x["key"], x["tokens"])]), label="copy")
        # one match per matched document (x-near, v-near; leaked), counted in the data after SmallestMatch
        matches = out["pairs"] | beam.Filter(lambda kv: kv[0].endswith(cp.MATCHES))
        assert_that(matches, equal_to([("dedup_matches", 2), ("leakage_matches", 1)]), label="matches")


def test_normalize_text():
    assert normalize_text("  Caf\u0065\u0301\r\nnext\x00 line\x07\t  ") == "Caf\u00e9\nnext line\t".strip()
    assert normalize_text(" \n\t ") == ""


# ---------------------------------------------------------------------------------------------
# End to end on a small mixed corpus with every kind of bad input.


@pytest.fixture(scope="module")
def small_db(tmp_path_factory, corpus_docs):
    root = tmp_path_factory.mktemp("corpus")
    write_mixed_corpus(root / "in", corpus_docs[:160])
    db = str(root / "db")
    config = cp.ChunkConfig(num_shards=2, valid_fraction=0.1, test_fraction=0.1, max_record_bytes=200_000)
    record = cp.write_chunk_shards([str(root / "in")], db, config=config, vocab_size=2048, beam_args=BEAM_TEST_ARGS)
    return root, db, config, record


def read_split(db, split, kind="chunks"):
    files = sorted(glob.glob(os.path.join(db, kind, split, "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def test_counts_add_up_and_every_bad_record_is_a_dead_letter(small_db):
    root, db, _, record = small_db
    counts = record["counts"]
    rejected = {k[len("rejected_") :]: v for k, v in counts.items() if k.startswith("rejected_")}
    assert counts["balanced"] and counts["records_read"] == counts["documents_kept"] + sum(rejected.values())
    for reason in (
        "malformed_json",
        "missing_text",
        "empty",
        "record_too_large",
        "invalid_utf8",
        "truncated_stream",
        "empty_file",
    ):
        assert rejected.get(reason, 0) >= 1, reason
    letters = [json.loads(line) for f in glob.glob(os.path.join(db, "rejected", "*.jsonl")) for line in open(f)]
    assert len(letters) == sum(rejected.values())
    part0 = str(root / "in" / "part-0.jsonl")
    by_reason = {(r["reason"], r["source"], r["position"]) for r in letters}
    assert ("malformed_json", part0, 4) in by_reason and ("missing_text", part0, 8) in by_reason
    assert ("record_too_large", part0, 13) in by_reason
    # line 10 copies line 1: retrieval-only if line 1 is a train document, else rejected
    first = cp.split_of(document_key(normalize_text(json.loads(open(part0).readline())["text"])), small_db[2])
    retrieval = read_split(db, "retrieval", "documents")
    copies = (
        []
        if retrieval is None
        else [(s, p) for s, p in zip(retrieval["source"].to_pylist(), retrieval["position"].to_pylist())]
    )
    assert (("exact_duplicate", part0, 10) in by_reason) == (first != "train") and ((part0, 10) in copies) == (
        first == "train"
    )
    assert any(r["reason"] == "truncated_stream" and r["source"].endswith("part-2.jsonl.zst") for r in letters)
    assert any(r["reason"] == "empty_file" and r["source"].endswith("empty.jsonl") for r in letters)


def test_chunk_ids_are_dense_and_continuations_follow(small_db):
    _, db, config, record = small_db
    tables = [read_split(db, s) for s in cp.SPLITS]
    assert all(t is not None and t.num_rows for t in tables)
    ids = np.concatenate([t["chunk_id"].to_numpy() for t in tables])
    assert np.array_equal(ids, np.arange(len(ids)))  # dense, in (split, shard, document, chunk) order
    all_chunks = pa.concat_tables(tables)
    doc = all_chunks["doc_id"].to_numpy()
    idx = all_chunks["chunk_index"].to_numpy()
    same_doc = doc[1:] == doc[:-1]
    assert np.array_equal(idx[1:][same_doc], idx[:-1][same_doc] + 1)  # chunk i+1 continues chunk i
    assert np.all(idx[1:][~same_doc] == 0)
    lengths = np.array([len(t) for t in all_chunks["tokens"].to_pylist()])
    last = np.append(~same_doc, True)
    assert np.all(lengths[~last] == config.chunk_size) and np.all(
        (lengths[last] >= 1) & (lengths[last] <= config.chunk_size)
    )
    assert all_chunks.schema.field("tokens").type == pa.list_(pa.uint16())
    assert record["counts"]["chunks"] == len(ids)


def test_chunks_decode_to_the_documents_text(small_db, corpus_docs):
    _, db, _, _ = small_db
    tokenizer = load_lm_tokenizer(os.path.join(db, "tokenizer.json"))
    chunks, docs = read_split(db, "train"), read_split(db, "train", "documents")
    first = docs.slice(0, 1).to_pylist()[0]
    rows = chunks.filter(pa.compute.equal(chunks["doc_id"], first["doc_id"])).to_pylist()
    tokens = [t for r in rows for t in r["tokens"]]
    assert tokens[-1] == tokenizer.token_to_id(EOS)
    text = tokenizer.decode(tokens[:-1])
    assert text in {normalize_text(d["text"]) for d in corpus_docs[:160]}
    assert sum(r["n_bytes"] for r in rows) == len(text.encode()) == first["n_bytes"]


def test_rerun_skips_and_rebuild_gives_the_same_bytes(small_db):
    root, db, config, record = small_db
    digests = {
        p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in glob.glob(os.path.join(db, "*", "*", "*.parquet"))
    }
    again = cp.write_chunk_shards(
        [str(root / "in")], db, config=cp.ChunkConfig(**{**config.__dict__}), vocab_size=2048, beam_args=BEAM_TEST_ARGS
    )
    assert again["updated"] == record["updated"]  # skipped: nothing rewritten
    copy = str(root / "db-copy")
    shutil.copytree(db, copy)
    victim = sorted(digests)[0].replace(db, copy)
    os.remove(victim)  # a crash that lost a shard
    cp.write_chunk_shards(
        [str(root / "in")],
        copy,
        config=cp.ChunkConfig(**{**config.__dict__}),
        vocab_size=2048,
        beam_args=BEAM_TEST_ARGS,
    )
    rebuilt = {
        p.replace(copy, db): hashlib.sha256(open(p, "rb").read()).hexdigest()
        for p in glob.glob(os.path.join(copy, "*", "*", "*.parquet"))
    }
    assert rebuilt == digests


def test_changed_config_is_refused_unless_overwrite(small_db):
    root, db, config, _ = small_db
    changed = cp.ChunkConfig(**{**config.__dict__, "chunk_size": 32})
    with pytest.raises(ConfigMismatch, match="chunk_size"):
        cp.write_chunk_shards([str(root / "in")], db, config=changed, vocab_size=2048, beam_args=BEAM_TEST_ARGS)
    copy = str(root / "db-overwrite")
    shutil.copytree(db, copy)
    record = cp.write_chunk_shards(
        [str(root / "in")], copy, config=changed, vocab_size=2048, beam_args=BEAM_TEST_ARGS, overwrite=True
    )
    assert record["config"]["chunk_size"] == 32
    assert max(len(t) for t in read_split(copy, "train")["tokens"].to_pylist()) == 32
    assert read_manifest(copy)["stages"]["chunks"]["status"] == "complete"


def test_empty_corpus_gives_an_empty_but_balanced_stage(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": ""}\n{"oops": 1}\n')
    tok = str(tmp_path / "tok.json")
    train_lm_tokenizer(["some text to learn from"] * 10, vocab_size=300).save(tok)
    record = cp.write_chunk_shards(
        [str(tmp_path / "in")], str(tmp_path / "db"), tokenizer_path=tok, beam_args=BEAM_TEST_ARGS
    )
    assert record["counts"]["chunks"] == 0 and record["counts"]["records_read"] == 2 and record["counts"]["balanced"]


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no corpus files match"):
        cp.write_chunk_shards([str(tmp_path / "nope" / "*.jsonl")], str(tmp_path / "db"), beam_args=BEAM_TEST_ARGS)


def test_an_input_edited_in_place_to_the_same_size_is_not_taken_as_built(tmp_path):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"Document {i} says alpha beta gamma, then delta {i}."}) + "\n" for i in range(6))
    )
    tok = str(tmp_path / "tok.json")
    train_lm_tokenizer(["alpha beta gamma delta omega document says"] * 10, vocab_size=300).save(tok)
    db = str(tmp_path / "db")
    cp.write_chunk_shards([str(corpus)], db, tokenizer_path=tok, beam_args=BEAM_TEST_ARGS)
    edited = corpus.read_bytes().replace(b"alpha", b"omega")
    with open(corpus, "r+b") as f:  # same path, same size, other text
        f.write(edited)
    assert os.path.getsize(corpus) == len(edited)
    with pytest.raises(ConfigMismatch, match="inputs_modified"):
        cp.write_chunk_shards([str(corpus)], db, tokenizer_path=tok, beam_args=BEAM_TEST_ARGS)
    rebuilt = cp.write_chunk_shards([str(corpus)], db, tokenizer_path=tok, beam_args=BEAM_TEST_ARGS, overwrite=True)
    assert rebuilt["counts"]["documents_kept"] == 6


def test_a_leaked_documents_reason_names_the_configured_ngram_size():
    doc = {"key": b"k", "split": "train", "source": "a.jsonl", "position": 3, "meta": "", "tokens": b"", "copies": []}
    out = list(cp.ApplyDropsFn(leakage_ngram=7).process((b"k", {"doc": [doc], "near": [], "leak": [b"\x01\x02"]})))
    assert [(r.source, r.position, r.reason) for r in out] == [("a.jsonl", 3, cp.LEAKAGE)]
    assert out[0].detail == "7-gram Jaccard >= threshold with held-out document 0102"


def test_a_verified_pair_or_match_the_runner_lost_fails_the_stage_and_a_duplicated_one_does_not():
    """A leak lost between stages leaves the documents balanced (each doc is still written or rejected) but the
    leaked document in train: only the two counts of verified pairs (before SmallestMatch) or of matches (from
    SmallestMatch through the Join to the drop decisions) show it."""
    counters = {
        "dedup_pairs_verified": 10,
        "leakage_pairs_verified": 4,
        "dedup_matches_applied": 7,
        "leakage_matches_applied": 3,
    }
    counts = {"dedup_pairs_arrived": 10, "leakage_pairs_arrived": 4, "dedup_matches": 7, "leakage_matches": 3}
    cp.check_pairs_arrived(counters, counts)
    cp.check_pairs_arrived(counters, {**counts, "dedup_pairs_arrived": 12})  # a bundle run twice
    cp.check_pairs_arrived({**counters, "leakage_matches_applied": 4}, counts)  # the same, after the Join
    cp.check_pairs_arrived(None, {})  # a runner without metrics (Dask): not checked
    with pytest.raises(RuntimeError, match="lost verified pairs or matches.*'leakage_pairs_arrived': 2"):
        cp.check_pairs_arrived(counters, {**counts, "leakage_pairs_arrived": 2})
    with pytest.raises(RuntimeError, match="'dedup_pairs_arrived': 10"):
        cp.check_pairs_arrived(counters, {k: v for k, v in counts.items() if k != "dedup_pairs_arrived"})
    with pytest.raises(RuntimeError, match="'dedup_matches': 2"):  # lost on the way from SmallestMatch to ApplyDrops
        cp.check_pairs_arrived({**counters, "dedup_matches_applied": 5}, counts)
