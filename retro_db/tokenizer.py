"""The LM tokenizer of a DB (``DB/tokenizer.json``): a byte-level BPE in HF ``tokenizers`` format.

Byte-level BPE decodes losslessly, which the embedding stage relies on (LM tokens -> text -> BERT
tokens) and which makes bits-per-byte exact: every ordinary token stands for a fixed byte string.
The build trains it from the corpus (``pipeline.lm_tokenizer``) unless the user brings one.
"""

from __future__ import annotations

import codecs
import functools

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


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's ``bytes_to_unicode``) read backwards: vocabulary character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_texts(tokenizer: Tokenizer, ids) -> list[str]:
    """The text each token of ``ids`` adds, in order: joined they are ``tokenizer.decode(ids,
    skip_special_tokens=False)``. A character split over several byte-level tokens belongs to the
    token that completes it (the others add ''), so every piece is valid text to display."""
    if not isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
        return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]
    byte_of, specials = _byte_of_char(), {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for i in ids:
        i = int(i)
        if i in specials:
            out.append(decoder.decode(b"", final=True) + specials[i])
            decoder.reset()
        else:
            out.append(decoder.decode(bytes(byte_of[c] for c in tokenizer.id_to_token(i))))
    if out:
        out[-1] += decoder.decode(b"", final=True)
    return out
