"""RETRO: CCA causality against a per-chunk loop, perturbation, retrieval off, training, resume,
RETRO-fitting, DDP on gloo, evaluation."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from model.checkpoint import load as load_model
from model.data import CorpusSequences, RetroSequences, longest_common_run
from model.evaluate import chunk_leakage, evaluate, evaluate_run, paired_difference, summary
from model.model import ChunkedCrossAttention, Retro, tiny_config
from model.retrieval import Neighbours
from model.train import TrainConfig, train

M = 8  # a small chunk size keeps these tests fast; the code is the same for m = 64


def small_config(**kw):
    return tiny_config(
        **{
            **dict(
                vocab_size=97, n_embd=32, n_head=4, n_layer=4, cca_layers=[2, 4], chunk_size=M, max_chunks=4, pad_id=0
            ),
            **kw,
        }
    )


def test_cca_matches_a_per_chunk_loop_of_the_papers_rule():
    torch.manual_seed(0)
    cfg = small_config()
    cca = ChunkedCrossAttention(cfg).eval()
    b, l, k, r, c = 2, 4, 3, 2 * M, cfg.n_embd
    h = torch.randn(b, l * M, c)
    encoded = torch.randn(b, l, k, r, c)
    mask = torch.rand(b, l, k) > 0.3
    mask[0, 1] = False  # a chunk with no neighbours at all
    out = cca(h, encoded, mask)
    expected = torch.zeros_like(h)
    for bi in range(b):
        for i in range(l * M):
            if i < M - 1:
                continue  # tokens 1..m-1 attend to nothing
            u = (i - (M - 1)) // M  # last token of chunk u and first m-1 tokens of chunk u+1 -> neighbours of u
            if not mask[bi, u].any():
                continue
            memory = encoded[bi, u][mask[bi, u]].reshape(1, -1, c)  # neighbours and time together
            # relative positions: the token sits at i - u*m in chunk u's coordinates, [N, F] at 0..2m-1
            positions = (torch.tensor([i - u * M]), torch.arange(r).repeat(int(mask[bi, u].sum())))
            expected[bi, i] = cca.attn(h[bi, i].reshape(1, 1, c), memory, positions=positions)[0, 0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_changing_neighbours_of_chunk_u_changes_nothing_before_its_last_token():
    torch.manual_seed(1)
    cfg = small_config()
    model = Retro(cfg).eval()
    b, l, k = 2, cfg.max_chunks, 2
    idx = torch.randint(2, cfg.vocab_size, (b, l * M))
    neighbours = torch.randint(2, cfg.vocab_size, (b, l, k, 2 * M))
    base, _, _ = model(idx, neighbours)
    for u in range(l):
        changed = neighbours.clone()
        changed[:, u] = torch.randint(2, cfg.vocab_size, (b, k, 2 * M))
        out, _, _ = model(idx, changed)
        first = u * M + M - 1  # the last token of chunk u
        torch.testing.assert_close(out[:, :first], base[:, :first])
        assert not torch.allclose(out[:, first:], base[:, first:])


def test_retrieval_off_is_exactly_the_decoder():
    torch.manual_seed(2)
    cfg = small_config()
    model = Retro(cfg).eval()
    idx = torch.randint(2, cfg.vocab_size, (2, cfg.max_chunks * M))
    no_neighbours = torch.full((2, cfg.max_chunks, 2, 2 * M), cfg.pad_id)
    off, _, _ = model(idx, None)
    masked, _, _ = model(idx, no_neighbours)
    assert torch.equal(off, masked)
    baseline = Retro(small_config(retrieval=False)).eval()
    state = {k: v for k, v in model.state_dict().items() if k in baseline.state_dict()}
    baseline.load_state_dict(state)
    assert torch.equal(baseline(idx)[0], off)


def test_neighbour_padding_is_the_same_as_its_absence():
    """Padding is masked in the encoder and in CCA: the reference is the same neighbours cut short,
    which the model sees with no padding at all (a neighbour's coordinates start at 0 either way)."""
    torch.manual_seed(3)
    cfg = small_config()
    model = Retro(cfg).eval()
    b, l, k = 2, cfg.max_chunks, 3
    idx = torch.randint(2, cfg.vocab_size, (b, l * M))
    n = torch.randint(2, cfg.vocab_size, (b, l, k, 2 * M))
    no_continuation = n.clone()
    no_continuation[..., M:] = cfg.pad_id  # every neighbour is a document's last chunk
    torch.testing.assert_close(model(idx, no_continuation)[0], model(idx, n[..., :M])[0], atol=1e-5, rtol=1e-4)
    short = no_continuation.clone()
    short[..., 5:] = cfg.pad_id  # chunks of 5 tokens
    torch.testing.assert_close(model(idx, short)[0], model(idx, n[..., :5])[0], atol=1e-5, rtol=1e-4)
    one_missing = n.clone()
    one_missing[:, :, 1] = cfg.pad_id  # neighbour 1 absent everywhere = k - 1 neighbours
    torch.testing.assert_close(model(idx, one_missing)[0], model(idx, n[:, :, [0, 2]])[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model(idx, no_continuation)[0], model(idx, n)[0])  # the continuation does count


def test_dataset_sequences_targets_and_neighbours(db):
    data = RetroSequences(db, "train", chunks_per_seq=4, k=2)
    x, y, neighbours, target_bytes, ids = data[3]
    assert x.shape == (4 * data.m,) and neighbours.shape == (4, 2, 2 * data.m)
    assert torch.all(y[x.eq(data.pad_id)[1:].nonzero().flatten()] == -100)  # no target is padding
    real = y != -100
    assert torch.equal(y[:-1][real[:-1]], x[1:][real[:-1]])
    seq_docs = set(data.store.doc_of(ids.numpy()).tolist())
    raw = data.neighbour_ids(ids.numpy())  # the stored table only excludes each chunk's own document
    for u in range(4):  # the dataset drops any neighbour from any document of the sequence
        for j in range(2):
            if raw[u, j] >= 0 and int(data.store.doc_of([raw[u, j]])[0]) in seq_docs:
                assert torch.all(neighbours[u, j] == data.pad_id)
            elif raw[u, j] >= 0:
                assert torch.equal(
                    neighbours[u, j], torch.from_numpy(data.store.neighbour_tokens([raw[u, j]], data.pad_id)[0])
                )
    assert int(target_bytes.sum()) > 0


def test_aligned_neighbours_are_their_documents_text_moved_to_line_up_with_their_chunk(db):
    import pyarrow.parquet as pq

    from retro_db.layout import INDEXED_SPLITS, chunk_shard_files

    data = RetroSequences(db, "train", chunks_per_seq=4, k=2)
    aligned = RetroSequences(db, "train", chunks_per_seq=4, k=2, align=True)  # what RETRO trains on by default
    m = data.m
    # the reference: every indexed document's tokens and where each chunk starts in them, from the Parquet shards
    docs, where = {}, {}
    for f in chunk_shard_files(db, INDEXED_SPLITS):
        for cid, doc, tokens in zip(
            *(
                pq.read_table(f, columns=["chunk_id", "doc_id", "tokens"])[c].to_pylist()
                for c in ("chunk_id", "doc_id", "tokens")
            )
        ):
            where[cid] = (doc, len(docs.setdefault(doc, [])))
            docs[doc] += tokens

    def window_shifts(row: list[int], doc: int, first: int) -> list[int]:
        """The shifts (|shift| < m) at which ``row`` is the document's 2m tokens from first + shift, chunks
        n-1 .. n+2 only, padding elsewhere."""
        text = docs[doc]
        lo, hi = max(0, first - m), min(len(text), first + 3 * m)
        return [
            d
            for d in range(-(m - 1), m)
            if row == [text[p] if lo <= p < hi else data.pad_id for p in range(first + d, first + d + 2 * m)]
        ]

    weight = torch.arange(1, m + 1)  # alignment favours a chunk's last tokens, nearest the text to come
    moved = checked = 0
    for i in range(len(data)):
        x, y, plain_rows, _, ids = data[i]
        ax, ay, rows, _, _ = aligned[i]
        assert torch.equal(x, ax) and torch.equal(y, ay)
        chunks = x.reshape(4, m)
        raw = data.neighbour_ids(ids.numpy())
        for u in range(4):
            for j in range(2):
                if torch.all(plain_rows[u, j] == data.pad_id):  # dropped (own document, deleted): stays dropped
                    assert torch.all(rows[u, j] == data.pad_id)
                    continue
                shifts = window_shifts(rows[u, j].tolist(), *where[int(raw[u, j])])
                assert shifts, f"neighbour {raw[u, j]} of sequence {i}: not a window of its document"
                lined_up = [
                    int(((row[:m] == chunks[u]) & (chunks[u] != data.pad_id)).mul(weight).sum())
                    for row in (rows[u, j], plain_rows[u, j])
                ]
                assert lined_up[0] >= lined_up[1]
                moved += 0 not in shifts
                checked += 1
    assert checked > 50 and moved > 0  # the session DB holds edited copies (near-duplicates), whose windows move


def test_deleted_documents_leave_training_and_refreshed_tables_replace_them_as_a_fresh_stage_would(db, tmp_path):
    import glob
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.neighbours import refresh_neighbours, write_neighbours
    from retro_db import deletions
    from retro_db.manifest import read_manifest, write_manifest
    from retro_db.storage import sha256_file
    from retro_db.token_store import TokenStore

    work = str(tmp_path / "db")
    shutil.copytree(db, work)
    tables = {f: pq.read_table(f) for f in sorted(glob.glob(os.path.join(work, "neighbours", "*", "*.parquet")))}
    store = TokenStore(work)
    used = np.concatenate([t["neighbour_ids"].combine_chunks().values.to_numpy() for t in tables.values()])
    docs, counts = np.unique(store.doc_of(used[used >= 0]), return_counts=True)
    victims = docs[np.argsort(-counts)[:3]].tolist()  # the documents most often retrieved: the refresh has work
    deletions.delete_documents(work, victims, store, reason="test", actor="test")
    victims = deletions.deleted_doc_ids(work).tolist()  # with their exact copies

    # training: the victims' chunks are gone from the sequences, the rest close up in chunk-id order
    chunks = pa.concat_tables(
        [
            pq.read_table(f, columns=["chunk_id", "doc_id"])
            for f in sorted(glob.glob(os.path.join(work, "chunks", "train", "*")))
        ]
    )
    expected = np.sort(chunks["chunk_id"].to_numpy()[~np.isin(chunks["doc_id"].to_numpy(), victims)])
    data = RetroSequences(work, "train", chunks_per_seq=4, k=2)
    assert len(data) == len(expected) // 4
    ids = np.concatenate([data[i][4].numpy() for i in range(len(data))])
    assert ids.tolist() == expected[: len(ids)].tolist()
    x, y = data[0][0], data[0][1]
    tail = store.chunks([expected[4]])[0][0, 0]  # the last target is the next live chunk's first token
    assert int(y[-1]) in (int(tail), -100) and int(x[0]) == int(store.chunks([expected[0]])[0][0, 0])

    deleted = deletions.deleted_chunk_ids(work)
    stale = {
        f: np.isin(t["neighbour_ids"].combine_chunks().values.to_numpy().reshape(t.num_rows, -1), deleted).any(1)
        for f, t in tables.items()
    }
    assert sum(s.sum() for s in stale.values()) > 0
    counts = refresh_neighbours(work)
    assert counts["rows_refreshed"] == sum(s.sum() for s in stale.values())

    # reference: the neighbour stage run afresh on a copy with the same deletions
    fresh = str(tmp_path / "fresh")
    shutil.copytree(work, fresh)
    shutil.rmtree(os.path.join(fresh, "neighbours"))
    manifest = read_manifest(fresh)
    manifest["stages"].pop("neighbours")
    write_manifest(fresh, manifest)
    write_neighbours(fresh)
    recorded = {s["path"]: s["sha256"] for s in read_manifest(work)["stages"]["neighbours"]["shards"]}
    for f, before in tables.items():
        after = pq.read_table(f)
        ids_after = after["neighbour_ids"].combine_chunks().values.to_numpy().reshape(after.num_rows, -1)
        ids_before = before["neighbour_ids"].combine_chunks().values.to_numpy().reshape(before.num_rows, -1)
        ids_fresh = (
            pq.read_table(f.replace(work, fresh))["neighbour_ids"]
            .combine_chunks()
            .values.to_numpy()
            .reshape(after.num_rows, -1)
        )
        assert not np.isin(ids_after, deleted).any()
        assert ((ids_after >= 0).sum(1) >= (ids_before >= 0).sum(1)).all()  # k kept: the next candidates fill in
        np.testing.assert_array_equal(ids_after[~stale[f]], ids_before[~stale[f]])  # untouched rows unchanged
        np.testing.assert_array_equal(
            ids_after[stale[f]], ids_fresh[stale[f]]
        )  # refreshed rows as a fresh stage finds them
        assert recorded[os.path.relpath(f, work)] == sha256_file(f)


def test_longest_common_run_equals_difflibs_longest_match():
    import difflib

    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.integers(0, 4, rng.integers(0, 20))
        rows = rng.integers(0, 4, (3, rng.integers(1, 30)))
        expected = max(
            difflib.SequenceMatcher(None, a.tolist(), r.tolist(), autojunk=False).find_longest_match().size
            for r in rows
        )
        assert longest_common_run(a, rows) == expected


def test_a_model_reads_only_the_neighbours_that_share_a_run_of_their_chunk():
    """`neighbours_sharing_text`: a row of chunk u is kept when its longest run shared with chunk u (difflib's
    longest match, the reference; a short last chunk counts its real tokens) exceeds ``min_query_overlap`` of
    that chunk, else it is padding; and the model reads the neighbours it keeps as if only those were given."""
    import difflib

    from model.model import neighbours_sharing_text

    torch.manual_seed(4)
    cfg = small_config(min_query_overlap=0.25)
    b, l, k, pad = 6, cfg.max_chunks, 3, cfg.pad_id
    rng = np.random.default_rng(4)
    idx = torch.from_numpy(rng.integers(2, 40, (b, l * M)))
    idx[0, -3:] = pad  # the last chunk of the first sequence is 5 tokens long
    rows = torch.from_numpy(rng.integers(40, cfg.vocab_size, (b, l, k, 2 * M)))  # tokens no chunk holds
    runs = rng.integers(0, M + 1, (b, l, k))
    for i, u, j in np.ndindex(b, l, k):
        chunk = idx[i, u * M : (u + 1) * M]
        chunk = chunk[chunk != pad]
        n = min(int(runs[i, u, j]), len(chunk))
        start = int(rng.integers(0, len(chunk) - n + 1))
        rows[i, u, j, 5 : 5 + n] = chunk[start : start + n]
    rows[1, 2, 0, 10:] = pad
    kept = neighbours_sharing_text(idx, rows, cfg)
    for i, u, j in np.ndindex(b, l, k):
        chunk = [t for t in idx[i, u * M : (u + 1) * M].tolist() if t != pad]
        row = [t if t != pad else -1 for t in rows[i, u, j].tolist()]
        longest = difflib.SequenceMatcher(None, chunk, row, autojunk=False).find_longest_match().size
        expected = rows[i, u, j] if longest > 0.25 * len(chunk) else torch.full((2 * M,), pad)
        assert torch.equal(kept[i, u, j], expected), (i, u, j)
    dropped = (kept == pad).all(-1) & ~(rows == pad).all(-1)
    assert 0 < int(dropped.sum()) < b * l * k
    model = Retro(cfg).eval()
    reads_all = Retro(small_config(min_query_overlap=0.0)).eval()
    reads_all.load_state_dict(model.state_dict())
    assert torch.equal(model(idx, rows)[0], reads_all(idx, kept)[0])
    assert not torch.equal(model(idx, rows)[0], reads_all(idx, rows)[0])


class _Constructed:
    """Two sequences of l = 3 chunks (m = 8) with chosen overlaps between each chunk and its own neighbours."""

    l, m, k, pad_id = 3, M, 2, 0

    def __init__(self):
        rng = np.random.default_rng(1)
        self.items = []
        for _ in range(2):
            chunks = rng.integers(10, 90, (3, M))
            neighbours = rng.integers(100, 200, (3, 2, 2 * M))  # tokens no chunk holds: r = 0
            neighbours[0, 1, 4 : 4 + M] = chunks[0]  # the first chunk is all inside its own neighbour: r = 1
            neighbours[1, 0, M : M + 3] = chunks[1, 2:5]  # 3 of 8 in a row in the continuation: r = 3/8
            neighbours[2, 0, :] = self.pad_id
            self.items.append((torch.from_numpy(chunks.reshape(-1)), None, torch.from_numpy(neighbours), None, None))
        self.items[1][0][2 * M + 5 :] = self.pad_id  # the last chunk is 5 tokens long: r over 5
        self.items[1][2][2, 1, :5] = self.items[1][0][2 * M : 2 * M + 5]  # and all of it retrieved: r = 1

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_leakage_uses_each_chunks_own_neighbours_the_first_chunk_included():
    leakage = chunk_leakage(_Constructed())
    np.testing.assert_allclose(leakage, [1.0, 3 / 8, 0.0, 1.0, 3 / 8, 1.0])
    nats, bytes_ = np.arange(1.0, 7.0), np.full(6, 10.0)
    by_alpha = summary(nats, bytes_, leakage)["bpb_by_alpha"]
    assert [by_alpha[a]["chunks"] for a in ("0", "0.125", "0.25", "0.5", "0.75", "1")] == [1, 1, 1, 3, 3, 6]
    assert by_alpha["0.5"]["bpb"] == pytest.approx((2 + 3 + 5) / np.log(2) / 30, abs=1e-5)  # chunks 2, 3, 5 (r <= 0.5)


def test_paired_bootstrap_interval_matches_scipys():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(2)
    bytes_ = rng.integers(100, 300, 400).astype(float)
    a = bytes_ * rng.normal(1.4, 0.3, 400)
    b = a + bytes_ * rng.normal(0.01, 0.05, 400)  # b worse by about 0.01 nats per byte
    ours = paired_difference(a, b, bytes_, resamples=4000)
    ref = bootstrap(
        (a, b, bytes_),
        lambda x, y, w, axis=-1: (x - y).sum(axis) / np.log(2) / w.sum(axis),
        paired=True,
        vectorized=True,
        n_resamples=4000,
        method="percentile",
        random_state=3,
    ).confidence_interval
    width = ref.high - ref.low
    assert ours["bpb"] == pytest.approx((a - b).sum() / np.log(2) / bytes_.sum(), abs=1e-6)
    assert abs(ours["ci95"][0] - ref.low) < 0.1 * width and abs(ours["ci95"][1] - ref.high) < 0.1 * width
    assert ours["ci95"][1] < 0  # a real difference is not called noise
    noise = rng.normal(0, 0.05, 200)
    halves = np.concatenate([bytes_[:200], bytes_[:200]])  # the second half undoes the first: no difference in all
    same = paired_difference(a, a + halves * np.concatenate([noise, -noise]), halves)
    assert same["bpb"] == pytest.approx(0, abs=1e-9) and same["ci95"][0] < 0 < same["ci95"][1]  # noise is


def test_target_bytes_are_the_texts_utf8_bytes_and_one_per_document_end(db):
    from retro_db.tokenizer import EOS, db_tokenizer, special_id

    tokenizer = db_tokenizer(db)
    eos = special_id(tokenizer, EOS)
    data = RetroSequences(db, "valid", chunks_per_seq=4, k=2)
    ends = 0
    for i in range(len(data)):
        _, y, _, target_bytes, _ = data[i]
        targets = y[y != -100].tolist()
        text = tokenizer.decode(targets, skip_special_tokens=True)
        ends += targets.count(eos)
        assert int(target_bytes.sum()) == len(text.encode("utf-8")) + targets.count(eos)
    assert ends > 0  # the split holds document ends, so the policy was exercised


def test_resume_continues_exactly(db, runs, tmp_path):
    root, cfg = runs
    half = TrainConfig(**{**cfg.__dict__, "steps": 3})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as the fixture trained: float sums may depend on the thread count
    try:
        train(db, str(tmp_path / "retro"), cfg=half)
        train(db, str(tmp_path / "retro"), cfg=cfg)  # resumes at step 3
    finally:
        torch.set_num_threads(threads)
    whole, _ = load_model(str(root / "retro" / "ckpt.pt"))
    resumed, ckpt = load_model(str(tmp_path / "retro" / "ckpt.pt"))
    assert ckpt["step"] == 6 and ckpt["model_config"]["retrieval"]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_checkpoint_is_not_resumed_on_a_db_rebuilt_with_other_neighbours(db, runs, tmp_path):
    """A rebuild in place that keeps the same train chunks (e.g. duplicates now kept for retrieval)
    changes what the model learns from: resuming would silently mix two trainings."""
    root, cfg = runs
    other = tmp_path / "db"
    shutil.copytree(db, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["stages"]["neighbours"]["config"]["index_shards"] = ["0" * 64]  # as after a rebuilt index
    (other / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "retro"
    shutil.copytree(root / "retro", out)
    longer = TrainConfig(**{**cfg.__dict__, "steps": cfg.steps + 1})
    with pytest.raises(ValueError, match="trained on other data"):
        train(str(other), str(out), cfg=longer)
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == cfg.steps  # untouched
    assert train(db, str(out), cfg=longer)["step"] == cfg.steps + 1  # its own DB resumes


def test_retrofit_keeps_retrieval_off_equal_to_the_baseline(db, runs, tmp_path):
    root, cfg = runs
    out = str(tmp_path / "retrofit")
    train(db, out, retrofit=str(root / "baseline" / "ckpt.pt"), cfg=cfg)
    retrofit, _ = load_model(os.path.join(out, "ckpt.pt"))
    baseline, _ = load_model(str(root / "baseline" / "ckpt.pt"))
    data = RetroSequences(db, "valid", chunks_per_seq=retrofit.config.max_chunks, k=2)
    off = evaluate(retrofit, data, retrieval=False)
    on = evaluate(retrofit, data, retrieval=True)
    assert off["bpb"] == evaluate(baseline, data, retrieval=False)["bpb"]
    assert on["bpb"] != off["bpb"]  # the trained CCA does something


def test_eval_writes_the_contract_with_intervals_and_bpb_alpha_one_is_bpb(db, runs):
    root, _ = runs
    results = evaluate_run(db, str(root))
    saved = json.load(open(root / "eval.json"))
    for name in ("retro_on", "retro_off", "baseline"):
        assert 0 < saved[name]["bpb"] == saved[name]["test"]["bpb"] < 20
        assert saved[name]["test"]["bpb_by_alpha"]["1"]["bpb"] == pytest.approx(saved[name]["test"]["bpb"], rel=1e-4)
        assert saved[name]["test"]["bpb_by_alpha"]["1"]["chunks"] == saved[name]["test"]["chunks"]
    assert results["retro_off"]["test"]["bpb"] != results["retro_on"]["test"]["bpb"]
    for diff in ("retro_on-retro_off", "retro_on-baseline"):
        d = saved["differences"][diff]["test"]
        a, b = diff.split("-")
        assert d["bpb"] == pytest.approx(saved[a]["test"]["bpb"] - saved[b]["test"]["bpb"], abs=2e-5)
        assert d["ci95"][0] <= d["bpb"] <= d["ci95"][1]
    assert saved["config"]["k"] == 2 and saved["config"]["eos_bytes"] == 1


def test_any_corpus_is_chunked_as_the_db_chunks_it_and_retrieved_live_without_its_own_copy(db, runs, tmp_path):
    """Documents of the DB's train split, evaluated as a corpus: their chunks are the stored chunks,
    no neighbour comes from the stored copy of the same text, and the rest are what a search finds."""
    import pyarrow.parquet as pq

    from model.retrieval import LocalRetriever
    from retro_db import layout
    from retro_db.documents import DocumentCatalog
    from retro_db.token_store import TokenStore
    from retro_db.tokenizer import db_tokenizer

    store = TokenStore(db)
    docs = pq.read_table(layout.document_shard_files(db)[0]).to_pylist()[:3]
    corpus = tmp_path / "docs.jsonl"
    lines = {d["doc_id"]: open(d["source"]).readlines()[d["position"] - 1] for d in docs}  # each document's corpus line
    corpus.write_text("".join(lines[d["doc_id"]] for d in docs) + "not json\n")
    data = CorpusSequences(db, [str(corpus)], chunks_per_seq=4, k=3)
    assert data.documents == 3 and data.rejected == {"malformed_json": 1}
    ids, _ = store.chunks_of_documents([d["doc_id"] for d in docs])
    stored, lengths = store.chunks(ids)
    np.testing.assert_array_equal(data.tokens, stored.astype(np.int64))
    np.testing.assert_array_equal(data.lengths, lengths)
    own = np.array([d["doc_id"] for d in docs])[data.chunk_doc]  # each chunk's stored copy
    chunks = [t[:n].tolist() for t, n in zip(data.tokens, data.lengths)]
    plain = LocalRetriever(db).search(chunks, 64)  # the search without the rule
    assert (store.doc_of(plain[:, 0]) == own).mean() > 0.5  # most chunks' nearest is their own copy
    for row, doc in enumerate(own):
        others = [i for i in plain[row] if i >= 0 and store.doc_of([i])[0] != doc]
        assert data.neighbours[row].tolist() == others[:3]
    assert data.copies_dropped == 3 and DocumentCatalog(db).with_hashes([d["doc_hash"] for d in docs]).keys() == {
        d["doc_hash"] for d in docs
    }
    out = tmp_path / "eval.json"
    results = evaluate_run(db, str(runs[0]), corpus=[str(corpus)], out=str(out))
    assert json.load(open(out))["retro_on"]["bpb"] == results["retro_on"]["corpus"]["bpb"] > 0
    # every token but the first is predicted: the documents' bytes, one per document end, less the first token's
    first = len(db_tokenizer(db).decode([int(stored[0, 0])]).encode("utf-8"))
    assert results["retro_on"]["corpus"]["bytes"] == sum(d["n_bytes"] + 1 for d in docs) - first


def train_process(db, out, *, batch_size, ranks=1, steps=3):
    """``model.train`` in its own process (under torchrun with ``ranks`` > 1, gloo): its last logged loss and
    its parameters."""
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", "29533"]
    cmd = [sys.executable, *(launch if ranks > 1 else []), "-m", "model.train", "--db", db, "--out", out]
    cmd += ["--steps", str(steps), "--batch-size", str(batch_size), "--warmup-steps", "1"]
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    model, ckpt = load_model(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == log[-1]["step"] == steps
    return log[-1]["loss"], model.state_dict()


def test_ddp_on_two_processes_gives_the_parameters_of_one_process_with_the_same_global_batch(db, tmp_path):
    """Two gloo ranks of 2 sequences each (disjoint, by batch_indices) against one process of 4: the same
    sequences and the loss a mean over all their tokens, so the same updates up to the order of float sums.
    One process of 2 sequences (another batch) is the yardstick of a real difference."""
    ddp_loss, ddp = train_process(db, str(tmp_path / "ddp"), batch_size=2, ranks=2)
    one_loss, one = train_process(db, str(tmp_path / "one"), batch_size=4)
    _, half = train_process(db, str(tmp_path / "half"), batch_size=2)

    def largest_difference(a, b):
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    assert ddp.keys() == one.keys()
    assert abs(ddp_loss - one_loss) < 1e-3
    # Adam divides by the root of tiny second moments, so float-order noise reaches ~1e-5 after 3 steps of lr 1e-3
    same, other = largest_difference(ddp, one), largest_difference(half, one)
    assert same < 1e-4 and other > 30 * same, (same, other)


def test_generation_retrieves_every_chunk_and_reports_its_neighbours(db, runs):
    from model.generate import generate_text
    from model.retrieval import LocalRetriever
    from retro_db.tokenizer import load_lm_tokenizer

    root, _ = runs
    tokenizer = load_lm_tokenizer(os.path.join(db, "tokenizer.json"))
    prompt = "Python's for statement iterates over the items of any sequence, a list or a string, in order. " * 2
    chunks = generate_text(db, str(root / "retro" / "ckpt.pt"), prompt, max_new_tokens=100)
    retriever = LocalRetriever(db, k=2, align=True)  # what generate_text uses for this (aligned) model
    m = 64
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == len(tokenizer.encode(prompt).ids) + 100 and len(chunks) == -(-len(tokens) // m)
    assert chunks[0].neighbour_chunk_ids == []  # the first chunk is conditioned on nothing
    for u in range(1, len(chunks)):
        expected = retriever(tokens[(u - 1) * m : u * m]).ids  # retrieved by the chunk before
        assert chunks[u].neighbour_chunk_ids == [int(i) for i in expected]
        assert len(chunks[u].neighbour_texts) == 2 and all(chunks[u].neighbour_texts)


def test_cca_learns_to_use_retrieved_continuations():
    """Random tokens have nothing to learn; when each chunk's neighbour is [chunk u, chunk u+1],
    RETRO's loss on tokens after the first chunk drops below the baseline's, which cannot."""
    m, l, v = 8, 4, 64

    def batch(gen, b=16):
        x = torch.randint(2, v, (b, l * m + m), generator=gen)
        chunks = x.reshape(b, l + 1, m)
        neighbours = torch.cat([chunks[:, :-1], chunks[:, 1:]], dim=-1)[:, :, None]  # (b, l, k=1, 2m)
        return x[:, :-m], x[:, 1 : l * m + 1], neighbours

    losses = {}
    for retrieval in (True, False):
        torch.manual_seed(0)
        cfg = tiny_config(
            vocab_size=v,
            n_embd=64,
            n_head=4,
            n_layer=4,
            cca_layers=[2, 4],
            chunk_size=m,
            max_chunks=l,
            pad_id=0,
            retrieval=retrieval,
        )
        model = Retro(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(1)
        for _ in range(300):
            idx, y, nb = batch(gen)
            _, loss, _ = model(idx, nb if retrieval else None, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        idx, y, nb = batch(torch.Generator().manual_seed(2), 64)
        with torch.no_grad():
            _, _, token_loss = model(idx, nb if retrieval else None, y)
        losses[retrieval] = token_loss[:, m:].mean().item()
    assert losses[False] > 4.0  # ln 64 = 4.16: the baseline cannot predict random tokens
    assert losses[True] < 1.0, losses  # relative positions make the copy easy: 0.012 nats after 300 steps here


def test_token_logprobs_are_what_each_generation_window_predicts():
    """Every token scored from the context generation gives it, with and without the neighbours;
    the reference is one forward pass per token over that window, written out here."""
    import torch.nn.functional as F

    from model.explain import token_logprobs

    torch.manual_seed(0)
    cfg = small_config(max_chunks=3)
    model = Retro(cfg).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, size=6 * M + 5).tolist()
    retrieved = {u: rng.integers(1, cfg.vocab_size, size=(2, 2 * M)) for u in range(6)}
    on, off = token_logprobs(model, tokens, retrieved)
    assert np.isnan(on[0]) and np.isnan(off[0])
    for i in range(1, len(tokens)):
        first = max(0, i // M + 1 - cfg.max_chunks)  # the last max_chunks whole chunks up to token i's
        context = tokens[first * M : i]
        l = len(context) // M + 1
        idx = torch.zeros((1, l * M), dtype=torch.long)
        idx[0, : len(context)] = torch.tensor(context)
        nb = torch.zeros((1, l, 2, 2 * M), dtype=torch.long)
        for u in range(l):
            if first + u < i // M:  # completed chunks only: the one token i is in has retrieved nothing yet
                nb[0, u] = torch.from_numpy(retrieved[first + u])
        with torch.no_grad():
            with_r, _, _ = model(idx, nb)
            without, _, _ = model(idx, None)
        assert on[i] == pytest.approx(F.log_softmax(with_r[0, len(context) - 1], -1)[tokens[i]].item(), abs=1e-5)
        assert off[i] == pytest.approx(F.log_softmax(without[0, len(context) - 1], -1)[tokens[i]].item(), abs=1e-5)
    assert np.allclose(on[1:M], off[1:M])  # nothing before the first chunk's last token retrieves
    assert not np.allclose(on[M:], off[M:])


def test_sampling_depends_on_the_seed_alone_however_generation_is_split():
    from model.generate import extend, generate

    torch.manual_seed(0)
    model = Retro(small_config()).eval()
    rows = np.random.default_rng(1).integers(1, 97, size=(2, 2 * M))

    def retrieve(chunk):
        return Neighbours(np.array([3, 4]), rows)

    prompt = list(range(1, 12))
    one, _ = generate(model, prompt, retrieve, max_new_tokens=3 * M, temperature=1.0, seed=7)
    assert one == generate(model, prompt, retrieve, max_new_tokens=3 * M, temperature=1.0, seed=7)[0]
    assert one != generate(model, prompt, retrieve, max_new_tokens=3 * M, temperature=1.0, seed=8)[0]
    tokens = list(prompt)  # token by token, as a service calling the model once per token would
    while len(tokens) < len(one):
        retrieved = {u: rows for u in range(len(tokens) // M)}
        tokens += extend(model, tokens, retrieved, 1, temperature=1.0, seed=7)
    assert tokens == one
