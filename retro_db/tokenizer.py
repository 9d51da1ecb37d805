"""The LM tokenizer of a DB (``DB/tokenizer.json``): a byte-level BPE in HF ``tokenizers`` format.

Byte-level BPE decodes losslessly, which the embedding stage relies on (LM tokens -> text -> BERT
tokens) and which makes bits-per-byte exact: every ordinary token stands for a fixed byte string.
The build trains it from the corpus (``pipeline.lm_tokenizer``) unless the user brings one.
"""

from __future__ import annotations

import codecs
import functools
import os

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


def tokenizer_for_db(path: str) -> Tokenizer:
    """A tokenizer a DB can be built with: a tokenizer JSON file, or a model directory holding
    ``tokenizer.json`` (a pretrained base's, so that the DB's chunks are the base's tokens). It must
    have ``<|endoftext|>``; ``<|pad|>`` is added after its vocabulary where it has none."""
    if os.path.isdir(path):  # a Hugging Face model directory names its tokenizer as a DB does
        path = os.path.join(path, layout.TOKENIZER)
    tokenizer = load_lm_tokenizer(path)
    special_id(tokenizer, EOS)
    if tokenizer.token_to_id(PAD) is None:
        tokenizer.add_special_tokens([PAD])
    return tokenizer


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
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenDecoder:
    """``tokenizer.decode_batch(rows, skip_special_tokens=False)`` of (n, m) token rows, vectorised for
    byte-level BPE: each id's bytes are looked up in one table and each row's are decoded as UTF-8
    (invalid sequences replaced, as ``tokenizers`` does). The service decodes every answer's chunks,
    several times faster than through ``decode_batch`` (docs/BENCHMARKS.md, Stage 5). Other
    tokenizers use ``decode_batch``."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel)
        if self.byte_level:
            byte_of = _byte_of_char()
            added = {i: t.content.encode("utf-8") for i, t in tokenizer.get_added_tokens_decoder().items()}
            pieces = [
                added[i] if i in added else bytes(byte_of[c] for c in tokenizer.id_to_token(i))
                for i in range(tokenizer.get_vocab_size(with_added_tokens=True))
            ]
            self.lengths = np.array([len(p) for p in pieces], dtype=np.int64)  # (vocab,)
            self.starts = np.cumsum(self.lengths) - self.lengths  # (vocab,) where each id's bytes begin in table
            self.table = np.frombuffer(b"".join(pieces), dtype=np.uint8)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
        """The text of each row's first ``lengths[i]`` tokens. tokens (n, m), lengths (n,)"""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if not self.byte_level:
            return self.tokenizer.decode_batch(
                [row[:n].tolist() for row, n in zip(tokens, lengths)], skip_special_tokens=False
            )
        ids = tokens[np.arange(tokens.shape[1]) < lengths[:, None]]  # row after row
        sizes = self.lengths[ids]  # bytes of each token
        ends = np.cumsum(sizes)
        # byte j of the output is table[start of its token + its offset within the token]
        data = self.table[
            np.arange(ends[-1] if len(ends) else 0) + np.repeat(self.starts[ids] - (ends - sizes), sizes)
        ].tobytes()
        row_ends = np.concatenate([[0], ends])[np.cumsum(lengths)].tolist()
        return [data[a:b].decode("utf-8", errors="replace") for a, b in zip([0] + row_ends[:-1], row_ends)]


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
