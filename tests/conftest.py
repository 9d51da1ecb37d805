import json
import logging
import os

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


@pytest.fixture(scope="session")
def corpus_docs():
    return default_corpus_docs()
