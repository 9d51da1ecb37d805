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

import logging
import os
from functools import lru_cache

import numpy as np
import pyarrow.parquet as pq
import torch

from retro_db import corpus as corpus_format
from retro_db import layout
from retro_db.deletions import deleted_chunk_ids
from retro_db.manifest import DBNotReady, require_stages
from retro_db.token_store import TokenStore, first_chunk_id
from retro_db.tokenizer import EOS, PAD, db_tokenizer, special_id, token_byte_lengths

log = logging.getLogger("model.data")

EOS_BYTES = 1  # what a predicted <|endoftext|> counts for in bits per byte (evaluation_byte_lengths)


class RetroSequences(torch.utils.data.Dataset):
    """Item i: tokens (l*m,), targets (l*m,) with -100 at padding, neighbours (l, k, 2m), bytes (l*m,).
    ``align``: neighbours lined up with their chunks (``RetroConfig.align_neighbours`` of the model fed)."""

    def __init__(self, db: str, split: str = "train", *, chunks_per_seq: int = 4, k: int = 2, align: bool = False):
        self.db, self.split, self.l, self.k, self.align = db, split, chunks_per_seq, k, align
        require_stages(db, ("chunks", "embeddings", "index", "neighbours"))
        self.store = TokenStore(db)  # every split: neighbours of valid/test chunks are train chunks
        tokenizer = db_tokenizer(db)
        self.pad_id = special_id(tokenizer, PAD)
        self.vocab_size = tokenizer.get_vocab_size()
        self.byte_lengths = evaluation_byte_lengths(tokenizer)
        self.m = self.store.chunk_size
        files = layout.chunk_shard_files(db, split)
        if not files:
            raise DBNotReady(f"{db}/{layout.CHUNKS}/{split} holds no shards (the corpus gave no {split} documents)")
        self.first = first_chunk_id(files[0])  # a split's shards are one contiguous id range
        self.n_chunks = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        self.neighbour_files = [layout.aligned_path(f, layout.NEIGHBOURS) for f in files]
        missing = [f for f in self.neighbour_files if not os.path.exists(f)]
        if missing:
            raise DBNotReady(
                f"neighbour shards missing ({missing[0]}, ...); run the neighbours stage (make build-db DB={db})"
            )
        # aligned with the chunk shards
        self.neighbour_starts = np.array([first_chunk_id(f) for f in files], dtype=np.int64)
        self.deleted = deleted_chunk_ids(db)  # documents removed after the tables were built
        inside = self.deleted[(self.deleted >= self.first) & (self.deleted < self.first + self.n_chunks)] - self.first
        # the j-th live chunk is first + j + (deleted chunks before it): a binary search over
        # deleted[t] - t, so no array of every live id is ever built
        self._skips = inside - np.arange(len(inside))
        self.n_live = self.n_chunks - len(inside)

    def __len__(self) -> int:
        return self.n_live // self.l

    def chunk_documents(self) -> np.ndarray:
        """The document id of every chunk the items hold, in item order. (len * l,)"""
        return self.store.doc_of(self.live_ids(np.arange(len(self) * self.l)))

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
        # the target after the last position is the next chunk's first token when it exists
        nxt = (i + 1) * self.l
        tail = int(self.store.chunks(self.live_ids(np.array([nxt])))[0][0, 0]) if nxt < self.n_live else self.pad_id
        neighbours = self.neighbour_ids(ids)  # (l, k)
        if len(self.deleted):
            neighbours[np.isin(neighbours, self.deleted)] = -1
        seq_docs = np.unique(self.store.doc_of(ids))
        valid = neighbours >= 0
        if valid.any():
            same = np.zeros_like(valid)
            same[valid] = np.isin(self.store.doc_of(neighbours[valid]), seq_docs)
            neighbours[same] = -1
        if self.align:  # each neighbour lined up with its own chunk u
            queries = [t[:n] for t, n in zip(tokens, lengths) for _ in range(self.k)]
            retrieved = self.store.aligned_neighbour_tokens(neighbours.reshape(-1), queries, self.pad_id)[0]
        else:
            retrieved = self.store.neighbour_tokens(neighbours.reshape(-1), self.pad_id)
        retrieved = retrieved.reshape(self.l, self.k, 2 * self.m)
        return sequence_item(tokens, lengths, tail, retrieved, ids, self.byte_lengths, self.pad_id)


class CorpusSequences(torch.utils.data.Dataset):
    """Sequences of l chunks from any text, cut by the DB's rules, with neighbours retrieved live.

    Each document is normalised, tokenized with ``<|endoftext|>`` and cut into chunks of m tokens as
    the chunk stage cuts a DB document (``retro_db.corpus``); documents follow each other in file
    order. Every chunk is embedded with the DB's frozen BERT and searched in the DB's index as it is
    now (increments included, deleted documents never returned). Neighbours from a DB document
    whose normalised text equals the evaluated document's are dropped: they would be the answer,
    not retrieval. Unreadable records are logged and counted in ``rejected``, never dropped silently.
    Items are ``RetroSequences``' items; ids are positions in this corpus's chunk list.
    """

    def __init__(
        self,
        db: str,
        corpus: list[str],
        *,
        chunks_per_seq: int = 4,
        k: int = 2,
        nprobe: int | None = None,
        device: str | None = None,
        text_field: str = "text",
        align: bool = False,
    ):
        from model.retrieval import LocalRetriever
        from retro_db.documents import DocumentCatalog

        self.db, self.l, self.k = db, chunks_per_seq, k
        tokenizer = db_tokenizer(db)
        self.pad_id = special_id(tokenizer, PAD)
        self.vocab_size = tokenizer.get_vocab_size()
        self.byte_lengths = evaluation_byte_lengths(tokenizer)
        retriever = LocalRetriever(db, k=k, nprobe=nprobe, device=device)
        self.store, self.m = retriever.store, retriever.store.chunk_size
        texts, keys, self.rejected = [], [], {}
        for path, size in corpus_format.match_local(corpus):
            for record in corpus_format.read_records(path, size, text_field=text_field):
                text = corpus_format.normalize_text(record.text) if isinstance(record, corpus_format.Record) else ""
                if not text:
                    reason = record.reason if isinstance(record, corpus_format.Rejected) else "empty"
                    log.warning(
                        "%s:%s not evaluated (%s)",
                        record.source,
                        record.position,
                        getattr(record, "detail", "no text after normalisation"),
                    )
                    self.rejected[reason] = self.rejected.get(reason, 0) + 1
                    continue
                texts.append(text)
                keys.append(corpus_format.document_key(text).hex())
        if not texts:
            raise ValueError(f"{' '.join(corpus)}: no document to evaluate (rejected: {self.rejected or 'none'})")
        eos = special_id(tokenizer, EOS)
        docs = [
            corpus_format.document_tokens(e.ids, eos)
            for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ]
        m = self.m
        counts = np.array([corpus_format.chunk_count(len(d), m) for d in docs])
        self.tokens = np.full((counts.sum(), m), self.pad_id, dtype=np.int64)  # (n, m)
        self.lengths = np.zeros(counts.sum(), dtype=np.int64)
        self.chunk_doc = np.repeat(np.arange(len(docs)), counts)  # (n,) index into ``texts``
        row = 0
        for d in docs:
            for start in range(0, len(d), m):
                piece = d[start : start + m]
                self.tokens[row, : len(piece)], self.lengths[row] = piece, len(piece)
                row += 1
        self.documents, self.n_live = len(docs), len(self.tokens)
        # search past the copies of an evaluated document (16 candidates per copy), so that k others
        # remain after dropping them; a chunk with fewer left gets -1s, which the model masks
        copies = DocumentCatalog(db).with_hashes(keys)
        extra = 16 * max((len(v) for v in copies.values()), default=0)
        ids = retriever.search([t[:n].tolist() for t, n in zip(self.tokens, self.lengths)], k + extra)  # (n, k + extra)
        if copies:
            own = np.zeros(ids.shape, dtype=bool)
            doc_of = np.full(ids.shape, -1, dtype=np.int64)
            doc_of[ids >= 0] = self.store.doc_of(ids[ids >= 0])
            for r, key in enumerate(np.array(keys)[self.chunk_doc]):
                own[r] = np.isin(doc_of[r], copies.get(key, []))
            order = np.argsort(own, axis=1, kind="stable")  # kept neighbours first, in distance order
            ids = np.where(np.take_along_axis(own, order, 1), -1, np.take_along_axis(ids, order, 1))
        self.neighbours = ids[:, :k]  # (n, k)
        self.shifts = None  # (n, k) with align: each neighbour's window moved to line up with its chunk
        if align:
            queries = [t[:n] for t, n in zip(self.tokens, self.lengths) for _ in range(k)]
            self.shifts = self.store.alignment_shifts(self.neighbours.reshape(-1), queries).reshape(
                self.neighbours.shape
            )
        self.copies_dropped = sum(len(v) for v in copies.values())

    def __len__(self) -> int:
        return -(-self.n_live // self.l)  # the last sequence is padded with empty chunks

    def chunk_documents(self) -> np.ndarray:
        """The corpus document (position in file order) of every chunk the items hold; -1 for the last
        item's empty chunks. (len * l,)"""
        rows = np.arange(len(self) * self.l)
        return np.where(rows < self.n_live, self.chunk_doc[np.minimum(rows, self.n_live - 1)], -1)

    def __getitem__(self, i: int):
        rows = i * self.l + np.arange(self.l)
        inside = rows < self.n_live
        tokens = np.full((self.l, self.m), self.pad_id, dtype=np.int64)
        lengths = np.zeros(self.l, dtype=np.int64)
        neighbours = np.full((self.l, self.k), -1, dtype=np.int64)
        tokens[inside], lengths[inside], neighbours[inside] = (
            self.tokens[rows[inside]],
            self.lengths[rows[inside]],
            self.neighbours[rows[inside]],
        )
        nxt = (i + 1) * self.l
        tail = int(self.tokens[nxt, 0]) if nxt < self.n_live else self.pad_id
        if self.shifts is None:
            retrieved = self.store.neighbour_tokens(neighbours.reshape(-1), self.pad_id)
        else:
            shifts = np.zeros((self.l, self.k), dtype=np.int64)
            shifts[inside] = self.shifts[rows[inside]]
            retrieved = self.store.shifted_neighbour_tokens(neighbours.reshape(-1), shifts.reshape(-1), self.pad_id)
        retrieved = retrieved.reshape(self.l, self.k, 2 * self.m)
        return sequence_item(
            tokens, lengths, tail, retrieved, np.where(inside, rows, -1), self.byte_lengths, self.pad_id
        )


def longest_common_run(chunk: np.ndarray, neighbours: np.ndarray) -> int:
    """The longest contiguous token run shared by ``chunk`` (n,) and any row of ``neighbours`` (k, r),
    padding excluded by the caller (pass -1 there: it matches nothing). Dynamic programming over
    the chunk, all neighbours at once."""
    if not len(chunk) or not neighbours.size:
        return 0
    best, prev = 0, np.zeros((neighbours.shape[0], neighbours.shape[1] + 1), dtype=np.int32)
    for token in chunk:
        cur = np.zeros_like(prev)
        cur[:, 1:] = np.where(neighbours == token, prev[:, :-1] + 1, 0)
        best = max(best, int(cur.max()))
        prev = cur
    return best


def evaluation_byte_lengths(tokenizer) -> np.ndarray:
    """The bytes each target token counts for in bits per byte: its UTF-8 bytes, and ``EOS_BYTES``
    for ``<|endoftext|>``. A document's end is predicted like a one-byte separator: its loss counts
    (the model is trained on it), and so does the one byte (a newline) that a byte-level model
    would predict there, so a document's bpb is its text's bytes plus one. (vocab,) int64"""
    lengths = token_byte_lengths(tokenizer).astype(np.int64)
    lengths[special_id(tokenizer, EOS)] = EOS_BYTES
    return lengths


def sequence_item(tokens, lengths, tail: int, retrieved, ids, byte_lengths, pad_id: int):
    """One item from l chunks: tokens (l, m) padded, their real ``lengths`` (l,), ``tail`` the token after
    them (``pad_id`` if none), [N, F] ``retrieved`` (l, k, 2m). -> x (l*m,), targets (l*m,) with -100 where
    nothing is predicted, retrieved, target bytes (l*m,), chunk ids (l,)."""
    m = tokens.shape[1]
    real = np.arange(m)[None, :] < lengths[:, None]  # (l, m)
    flat, flat_real = tokens.reshape(-1).astype(np.int64), real.reshape(-1)
    targets = np.append(flat[1:], tail)
    target_real = np.append(flat_real[1:], tail != pad_id)
    targets = np.where(target_real, targets, -100)
    target_bytes = np.where(target_real, byte_lengths[np.where(target_real, targets, 0)], 0)
    return (
        torch.from_numpy(flat),
        torch.from_numpy(targets),
        torch.from_numpy(np.asarray(retrieved, dtype=np.int64)),
        torch.from_numpy(target_bytes.astype(np.int64)),
        torch.from_numpy(np.asarray(ids, dtype=np.int64)),
    )
