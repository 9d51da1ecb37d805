"""Training and evaluation sequences from a built DB, fetched in O(1) from memory-mapped shards.

A sequence is l consecutive chunks in chunk-id order (documents follow each other, as in the
paper), each padded to m tokens; its neighbours are the k precomputed neighbour ids of each chunk,
turned into [N, F] tokens (r = 2m) by the token store. Neighbours from any document of the
sequence are dropped (the paper's rule for training), which the per-chunk tables cannot know.

Deleted documents (``retro_db.deletions``) are honoured twice: their chunks are left out of the
sequences (the chunks around them close up), and they are never neighbours (``python -m pipeline
refresh-neighbours`` replaces them in the tables by the next candidates; until then they are masked).

Axes: l chunks, m chunk size, k neighbours, r = 2m retrieved tokens.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import pyarrow.parquet as pq
import torch

from retro_db import layout
from retro_db.deletions import deleted_chunk_ids
from retro_db.manifest import DBNotReady, require_stages
from retro_db.token_store import TokenStore, first_chunk_id
from retro_db.tokenizer import PAD, db_tokenizer, special_id, token_byte_lengths


class RetroSequences(torch.utils.data.Dataset):
    """Item i: tokens (l*m,), targets (l*m,) with -100 at padding, neighbours (l, k, 2m), bytes (l*m,)."""

    def __init__(self, db: str, split: str = "train", *, chunks_per_seq: int = 4, k: int = 2):
        self.db, self.split, self.l, self.k = db, split, chunks_per_seq, k
        require_stages(db, ("chunks", "embeddings", "index", "neighbours"))
        self.store = TokenStore(db)  # every split: neighbours of valid/test chunks are train chunks
        tokenizer = db_tokenizer(db)
        self.pad_id = special_id(tokenizer, PAD)
        self.vocab_size = tokenizer.get_vocab_size()
        self.byte_lengths = token_byte_lengths(tokenizer)
        self.m = self.store.chunk_size
        files = layout.chunk_shard_files(db, split)
        if not files:
            raise DBNotReady(f"{db}/{layout.CHUNKS}/{split} holds no shards (the corpus gave no {split} documents)")
        self.first = first_chunk_id(files[0])  # a split's shards are one contiguous id range
        self.n_chunks = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        self.neighbour_files = [layout.aligned_path(f, layout.NEIGHBOURS) for f in files]
        missing = [f for f in self.neighbour_files if not os.path.exists(f)]
        if missing:
            raise DBNotReady(f"neighbour shards missing ({missing[0]}, ...); run the neighbours stage (make build-db DB={db})")
        self.neighbour_starts = np.array([first_chunk_id(f) for f in files], dtype=np.int64)  # aligned with the chunk shards
        self.deleted = deleted_chunk_ids(db)  # documents removed after the tables were built
        inside = self.deleted[(self.deleted >= self.first) & (self.deleted < self.first + self.n_chunks)] - self.first
        # the j-th live chunk is first + j + (deleted chunks before it): a binary search over
        # deleted[t] - t, so no array of every live id is ever built
        self._skips = inside - np.arange(len(inside))
        self.n_live = self.n_chunks - len(inside)

    def __len__(self) -> int:
        return self.n_live // self.l

    def live_ids(self, j: np.ndarray) -> np.ndarray:
        """Chunk ids of the j-th chunks of the split that are not deleted."""
        return self.first + j + np.searchsorted(self._skips, j, side="right")

    @lru_cache(maxsize=4)
    def _neighbour_shard(self, i: int) -> np.ndarray:
        """One shard's neighbour ids (n, K): shards are loaded one at a time, never the whole table."""
        table = pq.read_table(self.neighbour_files[i], columns=["neighbour_ids"])
        lists = table["neighbour_ids"].combine_chunks()
        return lists.values.to_numpy().reshape(len(lists), -1)

    def neighbour_ids(self, ids: np.ndarray) -> np.ndarray:
        """(n, k) neighbour ids of chunk ids (-1 padded)."""
        shard = np.searchsorted(self.neighbour_starts, ids, side="right") - 1
        out = np.full((len(ids), self.k), -1, dtype=np.int64)
        for s in np.unique(shard):
            sel = shard == s
            table = self._neighbour_shard(int(s))
            rows = table[ids[sel] - self.neighbour_starts[s]]
            out[sel, : min(self.k, rows.shape[1])] = rows[:, : self.k]
        return out

    def __getitem__(self, i: int):
        ids = self.live_ids(i * self.l + np.arange(self.l))
        tokens, lengths = self.store.chunks(ids)  # (l, m)
        tokens = tokens.astype(np.int64)
        real = np.arange(self.m)[None, :] < lengths[:, None]  # (l, m)
        flat, flat_real = tokens.reshape(-1), real.reshape(-1)
        # the target after the last position is the next chunk's first token when it exists
        nxt = (i + 1) * self.l
        tail = int(self.store.chunks(self.live_ids(np.array([nxt])))[0][0, 0]) if nxt < self.n_live else self.pad_id
        targets = np.append(flat[1:], tail)
        target_real = np.append(flat_real[1:], tail != self.pad_id)
        targets = np.where(target_real, targets, -100)
        neighbours = self.neighbour_ids(ids)  # (l, k)
        if len(self.deleted):
            neighbours[np.isin(neighbours, self.deleted)] = -1
        seq_docs = np.unique(self.store.doc_of(ids))
        valid = neighbours >= 0
        if valid.any():
            same = np.zeros_like(valid)
            same[valid] = np.isin(self.store.doc_of(neighbours[valid]), seq_docs)
            neighbours[same] = -1
        retrieved = self.store.neighbour_tokens(neighbours.reshape(-1), self.pad_id).reshape(self.l, self.k, 2 * self.m)
        target_bytes = np.where(target_real, self.byte_lengths[np.where(target_real, targets, 0)], 0)
        return (torch.from_numpy(flat), torch.from_numpy(targets), torch.from_numpy(retrieved),
                torch.from_numpy(target_bytes.astype(np.int64)), torch.from_numpy(ids))


def longest_common_substring(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common contiguous token run of a and b (dynamic programming)."""
    if not len(a) or not len(b):
        return 0
    best, prev = 0, np.zeros(len(b) + 1, dtype=np.int32)
    for x in a:
        cur = np.zeros_like(prev)
        cur[1:] = np.where(b == x, prev[:-1] + 1, 0)
        best = max(best, int(cur.max()))
        prev = cur
    return best
