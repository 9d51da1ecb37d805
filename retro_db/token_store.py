"""O(1) access to chunk tokens by chunk id, memory-mapped, never loaded whole.

Chunk ids are dense over shards in (split, shard) order, so a shard is found by a binary search
over the S shard start ids (O(log S), with S in the thousands at trillion-token scale) and a row
by subtraction. ``DB/tokens/<split>/shard-*/`` holds each chunk shard's tokens as a padded (n, m)
array plus its lengths and document ids (written once by the embeddings stage).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq

from retro_db import layout
from retro_db.manifest import BUILD_HINT, DBNotReady, db_roots

MIN_MATCH = 8  # tokens that must line up before a neighbour's window is moved (fewer: chance matches)


def _token_meta(token_dir: str) -> dict:
    with open(os.path.join(token_dir, layout.TOKEN_META)) as f:
        return json.load(f)


def first_chunk_id(chunk_file: str) -> int:
    """The shard's first chunk id, from the token shard's metadata (written before embedding)."""
    return _token_meta(layout.aligned_path(chunk_file, layout.TOKENS))["first_chunk_id"]


def read_chunk_shard(path: str, columns=("chunk_id", "doc_id", "tokens")):
    try:
        return pq.read_table(path, columns=list(columns))
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise ValueError(
            f"chunk shard {path} is unreadable ({type(e).__name__}: {e}); rebuild the chunks stage with --overwrite"
        ) from e


class ShardedRows:
    """Rows of per-shard .npy arrays addressed by global chunk id. Memory-mapped."""

    def __init__(self, arrays: list[np.ndarray], starts: list[int]):
        order = np.argsort(np.asarray(starts, dtype=np.int64), kind="stable")  # ids are found by binary search
        self.arrays, self.starts = [arrays[i] for i in order], np.asarray(starts, dtype=np.int64)[order]
        self.ends = self.starts + np.array([len(a) for a in self.arrays], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        valid = (shard >= 0) & (ids < self.ends[np.clip(shard, 0, None)])
        if not np.all(valid):
            raise KeyError(f"unknown chunk ids: {ids[~valid][:5].tolist()}")
        return shard, ids - self.starts[shard]

    def get(self, ids) -> np.ndarray:
        """Rows for ``ids`` in order. (n, ...)"""
        ids = np.asarray(ids, dtype=np.int64)
        shard, row = self.locate(ids)
        out = np.empty((len(ids),) + self.arrays[0].shape[1:], dtype=self.arrays[0].dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.arrays[s][row[sel]]
        return out


class TokenStore:
    """Tokens of chunk n and of its continuation, in O(1), from ``DB/tokens``.

    Axes: n queried ids, m chunk size. Padding is the LM tokenizer's pad id.
    """

    def __init__(self, db: str):
        dirs = [d for root in db_roots(db) for d in layout.token_shard_dirs(root)]
        if not dirs:
            raise DBNotReady(
                f"{db}/{layout.TOKENS} holds no token shards; "
                f"run the embeddings stage first ({BUILD_HINT.format(db=db)})"
            )
        metas = [_token_meta(d) for d in dirs]
        keep = [i for i, m in enumerate(metas) if m["rows"]]
        dirs, starts = [dirs[i] for i in keep], [metas[i]["first_chunk_id"] for i in keep]
        tokens, lengths, doc_ids = (
            [np.load(os.path.join(d, name), mmap_mode="r") for d in dirs] for name in layout.TOKEN_ARRAYS
        )
        self.tokens = ShardedRows(tokens, starts)
        self.lengths = ShardedRows(lengths, starts)
        self.doc_ids = ShardedRows(doc_ids, starts)
        self.chunk_size = self.tokens.arrays[0].shape[1]

    def __len__(self) -> int:
        return sum(len(a) for a in self.tokens.arrays)

    def chunks(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n, m), lengths (n,))"""
        return self.tokens.get(ids), self.lengths.get(ids)

    def doc_of(self, ids) -> np.ndarray:
        return self.doc_ids.get(ids)

    def chunks_of_documents(self, doc_ids) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids of the given documents, the doc ids among them that exist nowhere).

        Document ids grow with chunk ids, so each shard's doc id column is sorted: a binary
        search per shard, never a scan.
        """
        doc_ids = np.unique(np.asarray(doc_ids, dtype=np.int64))
        found, chunks = np.zeros(len(doc_ids), dtype=bool), []
        for start, docs in zip(self.doc_ids.starts, self.doc_ids.arrays):
            inside = (doc_ids >= docs[0]) & (doc_ids <= docs[-1])
            if not inside.any():
                continue
            lo = np.searchsorted(docs, doc_ids[inside], side="left")
            hi = np.searchsorted(docs, doc_ids[inside], side="right")
            found[np.flatnonzero(inside)[hi > lo]] = True
            chunks += [start + np.arange(a, b) for a, b in zip(lo, hi) if b > a]
        ids = np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.int64)
        return ids, doc_ids[~found]

    def continuations(self, ids, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of chunk n+1 where it is in the same document as n, else all padding. (n, m)"""
        ids = np.asarray(ids, dtype=np.int64)
        nxt = ids + 1
        exists = np.zeros(len(ids), dtype=bool)
        inside = nxt < self.tokens.ends[np.searchsorted(self.tokens.starts, ids, side="right") - 1]
        if inside.any():
            exists[inside] = self.doc_ids.get(nxt[inside]) == self.doc_ids.get(ids[inside])
        tokens = np.full((len(ids), self.chunk_size), pad_id, dtype=self.tokens.arrays[0].dtype)
        lengths = np.zeros(len(ids), dtype=np.int16)
        if exists.any():
            tokens[exists], lengths[exists] = self.chunks(nxt[exists])
        return tokens, lengths

    def _same_document(self, ids: np.ndarray, offset: int) -> np.ndarray:
        """Whether chunk id + offset exists in the same shard and document as id. (n,) bool"""
        shard = np.searchsorted(self.tokens.starts, ids, side="right") - 1
        other = ids + offset
        same = (other >= self.tokens.starts[shard]) & (other < self.tokens.ends[shard])
        if same.any():
            same[same] = self.doc_ids.get(other[same]) == self.doc_ids.get(ids[same])
        return same

    def _document_windows(self, ids: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """For each id (all valid): the real tokens of chunks n-1 .. n+2 that lie in n's document, and
        where chunk n starts in them."""
        m = self.chunk_size
        present = {0: np.ones(len(ids), dtype=bool), -1: self._same_document(ids, -1), 1: self._same_document(ids, 1)}
        present[2] = present[1] & self._same_document(ids, 2)
        pieces = {}
        for offset, here in present.items():
            tokens = np.zeros((len(ids), m), dtype=np.int64)
            lengths = np.zeros(len(ids), dtype=np.int64)
            if here.any():
                tokens[here], lengths[here] = self.chunks(ids[here] + offset)
            pieces[offset] = (tokens, lengths)
        return [
            (np.concatenate([pieces[o][0][row, : pieces[o][1][row]] for o in (-1, 0, 1, 2)]), int(pieces[-1][1][row]))
            for row in range(len(ids))
        ]

    def shifted_neighbour_tokens(self, ids, shifts, pad_id: int) -> np.ndarray:
        """[N, F] moved by ``shifts`` tokens along its document: the 2m tokens from ``shift`` after chunk n's
        first token (negative: before it), read from chunks n-1 .. n+2 of the same document, padding where
        that runs past them (so a token keeps its offset from the text it lines up with). A shift of 0 is
        ``neighbour_tokens``; -1 ids give all padding. (n, 2m)"""
        ids = np.asarray(ids, dtype=np.int64)
        valid = np.flatnonzero(ids >= 0)
        return self._windows_at(
            len(ids), valid, self._document_windows(ids[valid]), np.asarray(shifts, dtype=np.int64), pad_id
        )

    def alignment_shifts(self, ids, queries: list[np.ndarray], *, min_match: int = MIN_MATCH) -> np.ndarray:
        """For each neighbour id and the chunk that retrieved it (its real tokens): the shift along the
        neighbour's document (-(m-1) .. m-1) that lines the most of the chunk's tokens up with equal tokens
        of the document, later tokens weighing more (they are nearest the text to come); 0 where fewer than
        ``min_match`` tokens line up at the best shift, or the id is -1. (n,) int64"""
        ids = np.asarray(ids, dtype=np.int64)
        valid = np.flatnonzero(ids >= 0)
        return self._best_shifts(len(ids), valid, self._document_windows(ids[valid]), queries, min_match)

    def aligned_neighbour_tokens(self, ids, queries: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """[N, F] of each neighbour id lined up with the chunk that retrieved it (its real tokens in
        ``queries``): (tokens (n, 2m), the shifts applied (n,))."""
        ids = np.asarray(ids, dtype=np.int64)
        valid = np.flatnonzero(ids >= 0)
        windows = self._document_windows(ids[valid])
        shifts = self._best_shifts(len(ids), valid, windows, queries, MIN_MATCH)
        return self._windows_at(len(ids), valid, windows, shifts, pad_id), shifts

    def _windows_at(self, n: int, valid: np.ndarray, windows: list, shifts: np.ndarray, pad_id: int) -> np.ndarray:
        m = self.chunk_size
        out = np.full((n, 2 * m), pad_id, dtype=np.int64)
        for j, (text, first) in zip(valid, windows):
            start = first + int(shifts[j])
            lo, hi = max(start, 0), min(start + 2 * m, len(text))
            if hi > lo:
                out[j, lo - start : hi - start] = text[lo:hi]
        return out

    def _best_shifts(
        self, n: int, valid: np.ndarray, windows: list, queries: list[np.ndarray], min_match: int
    ) -> np.ndarray:
        m = self.chunk_size
        out = np.zeros(n, dtype=np.int64)
        deltas = np.arange(-(m - 1), m)
        order = np.argsort(np.abs(deltas), kind="stable")  # ties go to the smallest shift
        for j, (text, first) in zip(valid, windows):
            q = np.asarray(queries[j], dtype=np.int64)
            if not len(q) or not len(text):
                continue
            pos = first + deltas[:, None] + np.arange(len(q))[None, :]  # (2m-1, |q|)
            inside = (pos >= 0) & (pos < len(text))
            match = inside & (text[np.clip(pos, 0, len(text) - 1)] == q[None, :])
            score = (match * np.arange(1, len(q) + 1)[None, :]).sum(1)[order]
            best = order[int(np.argmax(score))]
            if match[best].sum() >= min_match:
                out[j] = deltas[best]
        return out

    def neighbour_tokens(self, ids, pad_id: int) -> np.ndarray:
        """[N, F] per neighbour id, r = 2m tokens; -1 ids give all padding. (n, 2m)"""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full((len(ids), 2 * self.chunk_size), pad_id, dtype=np.int64)
        valid = ids >= 0
        if valid.any():
            tokens, _ = self.chunks(ids[valid])
            cont, _ = self.continuations(ids[valid], pad_id)
            out[valid] = np.concatenate([tokens, cont], axis=1)
        return out
