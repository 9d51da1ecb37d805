"""The LM tokenizer of a DB (``DB/tokenizer.json``): a byte-level BPE in HF ``tokenizers`` format.

Byte-level BPE decodes losslessly, which the embedding stage relies on (LM tokens -> text -> BERT
tokens) and which makes bits-per-byte exact: every ordinary token stands for a fixed byte string.
The build trains it from the corpus (``pipeline.lm_tokenizer``) unless the user brings one.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, pre_tokenizers

from retro_db import layout, storage

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]


def load_lm_tokenizer(path_or_json: str) -> Tokenizer:
    """Loads from a local path, a bucket URI, or a JSON string."""
    if path_or_json.lstrip().startswith("{"):
        return Tokenizer.from_str(path_or_json)
    return Tokenizer.from_str(storage.read_bytes(path_or_json).decode("utf-8"))


def db_tokenizer(db: str) -> Tokenizer:
    return load_lm_tokenizer(layout.tokenizer_path(db))


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
