"""What the service answers, shaped from what it found: search results, chunks, the neighbours of a
generated or explained text, and per-token scores. Plain functions of the DB's token store and
catalogue (no Ray, no Serve): the ingress calls them, and tests call them directly.
"""

from __future__ import annotations

import numpy as np

from model.retrieval import Neighbours
from retro_db.documents import DocumentCatalog
from retro_db.token_store import TokenStore
from retro_db.tokenizer import PAD, TokenDecoder, special_id


class ResultBuilder:
    """Answers in the API's shapes (``index_service.api``), decoded with the DB's tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoder, self.pad_id = tokenizer, TokenDecoder(tokenizer), special_id(tokenizer, PAD)

    def chunks(self, store: TokenStore, ids: np.ndarray, with_tokens: bool) -> list[dict]:
        """Each chunk's id, document, text and continuation (and their LM tokens)."""
        tokens, lengths = store.chunks(ids)
        cont, cont_lengths = store.continuations(ids, self.pad_id)
        docs = store.doc_of(ids).tolist()
        # A continuation is the next chunk's text, and the neighbours of a request's queries overlap:
        # each distinct chunk is decoded once.
        keys = np.concatenate([ids, np.where(cont_lengths > 0, ids + 1, -1)])
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        decoded = self.decoder.decode(
            np.concatenate([tokens, cont])[first], np.concatenate([lengths, cont_lengths])[first]
        )
        texts = [decoded[j] for j in inverse.tolist()]
        out = []
        for j, cid in enumerate(ids.tolist()):
            item = {"chunk_id": cid, "doc_id": docs[j], "text": texts[j], "continuation": texts[len(ids) + j]}
            if with_tokens:
                item["tokens"], item["continuation_tokens"] = (
                    tokens[j, : lengths[j]].tolist(),
                    cont[j, : cont_lengths[j]].tolist(),
                )
            out.append(item)
        return out

    def search_results(
        self, store: TokenStore, dists: np.ndarray, ids: np.ndarray, with_tokens: bool
    ) -> list[list[dict]]:
        """One list per query of its found chunks (ids (n, k), -1 where fewer), nearest first, with their distances."""
        found = ids >= 0
        chunks = iter(self.chunks(store, ids[found], with_tokens) if found.any() else [])
        return [[{**next(chunks), "distance": d} for d in row[keep].tolist()] for row, keep in zip(dists, found)]

    def align(
        self, store: TokenStore, results: list[list[dict]], ids: np.ndarray, queries: list[list[int]], with_tokens: bool
    ) -> None:
        """Moves each result's window to line up with its query (``TokenStore.aligned_neighbour_tokens``), in place."""
        for found, row, query in zip(results, ids, queries):
            row = row[row >= 0]
            rows, shifts = store.aligned_neighbour_tokens(row, [np.asarray(query)] * len(row), self.pad_id)
            for hit, window, shift in zip(found, rows, shifts.tolist()):
                hit["shift"] = shift
                if shift:
                    hit.update(self.window(window, store.chunk_size, with_tokens))

    def window(self, window: np.ndarray, m: int, with_tokens: bool) -> dict:
        """text and continuation (and their tokens) of an [N, F] row (2m,)."""
        n, f = ([int(t) for t in part if t != self.pad_id] for part in (window[:m], window[m:]))
        text, continuation = self.tokenizer.decode_batch([n, f], skip_special_tokens=False)
        return {
            "text": text,
            "continuation": continuation,
            **({"tokens": n, "continuation_tokens": f} if with_tokens else {}),
        }

    def neighbours(self, store: TokenStore, documents: DocumentCatalog, hit: Neighbours | None) -> list[dict]:
        """A chunk's retrieved neighbours with the text the model read, their distance and source document."""
        if hit is None:
            return []
        found = hit.ids >= 0
        ids = hit.ids[found]
        if not ids.size:
            return []
        chunks = self.chunks(store, ids, with_tokens=False)
        shifts = hit.shifts[found].tolist() if hit.shifts is not None else [0] * len(chunks)
        for c, window, shift in zip(chunks, hit.rows[found], shifts):  # the window the model read
            c["shift"] = shift
            if shift:
                c.update(self.window(window, store.chunk_size, with_tokens=False))
        sources = documents.describe([c["doc_id"] for c in chunks])
        return [
            {
                **c,
                "distance": float(d),
                "source": sources.get(c["doc_id"], {"doc_id": c["doc_id"], "source": "", "position": -1, "meta": {}}),
            }
            for c, d in zip(chunks, hit.distances[found].tolist())
        ]

    def text_chunks(
        self, store: TokenStore, documents: DocumentCatalog, pieces: list[str], hits: dict[int, Neighbours], m: int
    ) -> list[dict]:
        """A text's chunks of ``m`` tokens (``pieces``: each token's text), each with the neighbours that
        conditioned it."""
        return [
            {
                "index": u,
                "start": u * m,
                "text": "".join(pieces[u * m : (u + 1) * m]),
                "neighbours": self.neighbours(store, documents, hits.get(u - 1)),
            }
            for u in range(-(-len(pieces) // m))
        ]


def token_scores(pieces: list[str], on: np.ndarray, off: np.ndarray) -> list[dict]:
    """Each token's text and log-probability with and without retrieval (null where nothing predicts it)."""
    return [
        {"text": p, "logprob": None if np.isnan(a) else a, "logprob_no_retrieval": None if np.isnan(b) else b}
        for p, a, b in zip(pieces, on.tolist(), off.tolist())
    ]
