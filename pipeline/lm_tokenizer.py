"""Training the LM tokenizer from the corpus itself, so that a DB is self-contained.

The sample is deterministic (the first ``sample_bytes`` of normalised text in sorted file order);
``retro_db.tokenizer`` reads the result.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from retro_db.tokenizer import SPECIAL_TOKENS

log = logging.getLogger(__name__)


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
