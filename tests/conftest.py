import json
import logging
import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("apache_beam").setLevel(logging.WARNING)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.join(REPO, "data", "python-docs-3.11.jsonl.zst")
BEAM_TEST_ARGS = ["--runner=FnApiRunner"]


def default_corpus_docs(limit=None):
    data = zstandard.ZstdDecompressor().decompress(open(DEFAULT_CORPUS, "rb").read(), max_output_size=1 << 30)
    docs = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    return docs[:limit] if limit else docs


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def audit_lines(db: str) -> list[dict]:
    """A DB's deletion audit log read as plain JSON lines (not through retro_db.deletions)."""
    path = os.path.join(db, "deleted", "audit.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


@pytest.fixture(scope="session")
def corpus_docs():
    return default_corpus_docs()


def write_mixed_corpus(root, docs):
    root.mkdir()
    texts = [d["text"] for d in docs]
    lines = [json.dumps({"text": t, "meta": {"i": i}}) for i, t in enumerate(texts[:60])]
    lines.insert(3, '{"text": "unterminated')  # malformed JSON, line 4
    lines.insert(7, '{"no_text": "here"}')  # missing text, line 8
    lines.insert(9, json.dumps({"text": texts[0]}))  # exact duplicate of line 1
    lines.insert(11, json.dumps({"text": "   \n  "}))  # empty after normalisation
    lines.insert(12, json.dumps({"text": "y" * 300_000}))  # huge record, line 13
    (root / "part-0.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff utf8"}\n')
    zst = "".join(json.dumps({"text": t}) + "\n" for t in texts[60:100]).encode()
    (root / "part-1.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst))
    cut = zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in texts[100:140]).encode())
    (root / "part-2.jsonl.zst").write_bytes(cut[: len(cut) * 2 // 3])
    pq.write_table(pa.table({"text": texts[140:150]}), root / "part-3.parquet")
    (root / "notes.txt").write_text(texts[150])
    (root / "empty.jsonl").write_bytes(b"")


BLOCK_ROWS = 256


# Documents written twice: 2-4 are train documents, whose copies stay retrievable (split "retrieval"),
# 12 is a valid and 18 a test document, whose copies are rejected as exact duplicates.
COPIED_DOCS = (2, 3, 4, 12, 18)


def build_chunks(root, n_docs=130):
    from pipeline import chunk_pipeline as cp

    corpus = root / "corpus.jsonl"
    docs = default_corpus_docs(n_docs)
    corpus.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in docs + [docs[i] for i in COPIED_DOCS]))
    db = str(root / "db")
    cp.write_chunk_shards(
        [str(corpus)],
        db,
        config=cp.ChunkConfig(num_shards=2, valid_fraction=0.08, test_fraction=0.08),
        vocab_size=2048,
        beam_args=BEAM_TEST_ARGS,
    )
    return db


@pytest.fixture(scope="session")
def db(tmp_path_factory):
    """A small DB built through every stage (130 documents of the default corpus)."""
    import shutil

    from pipeline.embed import EmbedConfig, write_embeddings
    from pipeline.index_build import write_index
    from pipeline.neighbours import write_neighbours

    root = tmp_path_factory.mktemp("build")
    db = build_chunks(root)
    shutil.copytree(db, str(root / "chunks-only"))
    write_embeddings(db, config=EmbedConfig(block_rows=BLOCK_ROWS))
    write_index(db)
    write_neighbours(db)
    return db


@pytest.fixture(scope="session")
def runs(db, tmp_path_factory):
    """RETRO and the baseline trained a few steps on the session DB, as `make train` lays them out."""
    import torch

    from model.train import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=3)
    threads = torch.get_num_threads()
    # the same weights bit for bit whatever an earlier test set (the recorded answers rely on it)
    torch.set_num_threads(2)
    try:
        train(db, str(root / "baseline"), baseline=True, cfg=cfg)
        train(db, str(root / "retro"), cfg=cfg)
    finally:
        torch.set_num_threads(threads)
    return root, cfg


def tiny_base(kind: str, seed: int = 0, vocab_size: int = 97, width: int = 32, layers: int = 4):
    """A random-weight Hugging Face causal LM of ``layers`` layers: the Llama layout or GPT-2."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=4, n_positions=512)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def retrofit_run(db, tmp_path_factory):
    """A tiny random-weight base (the Llama layout, the session DB's vocabulary) RETRO-fitted a few steps with
    the recipe, as `make retrofit` lays it out (RUN/retro). It reads every neighbour (min_query_overlap 0): a
    random base's text shares no run with the DB's, so the default filter would leave it nothing to read."""
    from model.train import TrainConfig, train
    from retro_db.tokenizer import db_tokenizer

    root = tmp_path_factory.mktemp("retrofit")
    base = str(root / "base")
    tiny_base("llama", vocab_size=db_tokenizer(db).get_vocab_size(), width=64).save_pretrained(base)
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=6, informative=0.5)
    train(db, str(root / "run" / "retro"), base=base, min_query_overlap=0.0, cfg=cfg)
    return root / "run"
