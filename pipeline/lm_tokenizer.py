"""The LM tokenizer: a byte-level BPE in HF ``tokenizers`` format.

By default it is trained from the corpus itself (a deterministic sample: the first
``sample_bytes`` of normalised text in sorted file order), so a DB is self-contained. Byte-level
BPE decodes losslessly, which the embedding stage relies on (LM tokens -> text -> BERT tokens)
and which makes bits-per-byte exact: every ordinary token stands for a fixed byte string.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]


def train_lm_tokenizer(texts: Iterable[str], *, vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Trains a byte-level BPE. Single-threaded on purpose: parallel word counting can break
    frequency ties differently from run to run, and the tokenizer must be reproducible."""
    previous = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
    finally:
        if previous is None:
            os.environ.pop("RAYON_NUM_THREADS", None)
        else:
            os.environ["RAYON_NUM_THREADS"] = previous
    log.info("trained a byte-level BPE with %d tokens", tokenizer.get_vocab_size())
    return tokenizer


def load_lm_tokenizer(path_or_json: str) -> Tokenizer:
    """Loads from a local path, a Beam filesystem URI, or a JSON string."""
    if path_or_json.lstrip().startswith("{"):
        return Tokenizer.from_str(path_or_json)
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path_or_json) as f:
        return Tokenizer.from_str(f.read().decode("utf-8"))


def special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the LM tokenizer has no {token!r} token; train one with pipeline.lm_tokenizer or add it")
    return token_id


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Bytes of text each token id decodes to (0 for special tokens). (vocab,) int32

    For byte-level BPE every vocabulary character stands for one byte; other tokenizers fall
    back to decoding each token alone.
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int32)
    byte_level = isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel)
    for token, token_id in vocab.items():
        if token in specials:
            continue
        lengths[token_id] = len(token) if byte_level else len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths
