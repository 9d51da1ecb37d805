"""MinHash signatures over token n-grams and LSH band keys, vectorised with numpy.

Shingles are n-grams of LM token ids (the paper measures leakage with 13-gram Jaccard), hashed
with a rolling polynomial hash and mixed once with splitmix64 to 32 bits; each of the
``num_perm`` hash functions is then a multiply-add ``a * x + b`` (mod 2**32, ``a`` odd): one
multiply per shingle and permutation, the cost that dominates MinHash. All arithmetic wraps
around in fixed-width integers, so the same tokens give the same signature on every machine.

LSH with ``bands`` bands of ``rows`` rows makes two documents of Jaccard J candidates with
probability 1 - (1 - J**rows)**bands; candidates are then verified on the full signature.
"""

from __future__ import annotations

import hashlib

import numpy as np

_PRIME = np.uint64(0x100000001B3)
_BLOCK = 1 << 15  # shingles hashed at once: bounds memory to num_perm * _BLOCK * 8 bytes


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutation_seeds(num_perm: int, seed: int = 1) -> np.ndarray:
    """(2, num_perm) uint32 multipliers (odd) and increments of the multiply-add family."""
    raw = (
        _splitmix64(np.arange(2 * num_perm, dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 32)) >> np.uint64(32)
    ).astype(np.uint32)
    return np.stack([raw[:num_perm] | np.uint32(1), raw[num_perm:]])


def shingle_hashes(tokens: np.ndarray, ngram: int, *, unique: bool = True) -> np.ndarray:
    """Hashes of the token n-grams (unique unless told); a document shorter than n is one shingle. (s,)"""
    t = np.asarray(tokens, dtype=np.uint64) + np.uint64(1)
    if len(t) == 0:
        return np.zeros(0, dtype=np.uint64)
    n = min(ngram, len(t))
    h = np.zeros(len(t) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _PRIME + t[j : len(t) - n + 1 + j]
    return np.unique(h) if unique else h


def signature(tokens: np.ndarray, *, ngram: int, seeds: np.ndarray) -> np.ndarray:
    """MinHash signature of a token sequence. (num_perm,) uint32; all-max for an empty one.

    ``a * x + b mod 2**32`` with odd ``a`` is a bijection of 32-bit values, so each row is a true
    permutation of the (well mixed) shingle hashes; 32-bit lanes halve the memory traffic.
    """
    multipliers, increments = seeds
    # repeated shingles cannot change a minimum, so no deduplication here
    shingles = (_splitmix64(shingle_hashes(tokens, ngram, unique=False)) >> np.uint64(32)).astype(np.uint32)
    sig = np.full(len(multipliers), np.iinfo(np.uint32).max, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for start in range(0, len(shingles), _BLOCK):
            hashed = multipliers[:, None] * shingles[None, start : start + _BLOCK]  # (num_perm, s)
            hashed += increments[:, None]
            np.minimum(sig, hashed.min(axis=1), out=sig)
    return sig


def band_keys(sig: np.ndarray, *, bands: int, rows: int) -> list[bytes]:
    """One key per band: the band index and a digest of its rows."""
    if bands * rows > len(sig):
        raise ValueError(f"bands*rows = {bands * rows} exceeds the signature length {len(sig)}")
    return [
        band.to_bytes(2, "big")
        + hashlib.blake2b(sig[band * rows : (band + 1) * rows].tobytes(), digest_size=8).digest()
        for band in range(bands)
    ]


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def exact_jaccard(a_tokens: np.ndarray, b_tokens: np.ndarray, ngram: int) -> float:
    """Jaccard of the two n-gram sets (used by tests and to audit the estimate)."""
    a, b = shingle_hashes(a_tokens, ngram), shingle_hashes(b_tokens, ngram)
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b)) / union if union else 1.0
