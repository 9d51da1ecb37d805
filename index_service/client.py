"""A small Python client for the index service, and ``ServiceRetriever``: generation in this process
with the neighbours a running service finds (``model.retrieval.Retriever``).

    from index_service.client import IndexClient
    client = IndexClient("http://127.0.0.1:8000")
    client.search(texts=["How do I sort a dict by value?"], k=2)[0][0]["text"]

    python -m index_service.client --url http://127.0.0.1:8000 --db db --ckpt runs/default/retro/ckpt.pt --prompt "..."
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import requests

from model.retrieval import Neighbours
from retro_db import cli
from retro_db.manifest import require_stages
from retro_db.tokenizer import PAD, db_tokenizer, special_id


class IndexServiceError(RuntimeError):
    def __init__(self, status: int, detail):
        super().__init__(f"index service answered {status}: {detail}")
        self.status, self.detail = status, detail


class IndexClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", *, token: str | None = None, timeout: float = 60.0):
        """``token``: the admin token for deletions and restorations (or a read token where reads need one)."""
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kwargs):
        response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise IndexServiceError(response.status_code, detail)
        return response.json()

    def search(
        self,
        *,
        texts=None,
        token_ids=None,
        embeddings=None,
        k: int = 10,
        nprobe: int | None = None,
        return_tokens: bool = False,
        align: bool = False,
    ) -> list[list[dict]]:
        """One list of neighbours per query, nearest first (see ``index_service.api.Neighbour``)."""
        body = {"k": k, "return_tokens": return_tokens, **({"align": True} if align else {})}
        for name, value in (("texts", texts), ("token_ids", token_ids), ("embeddings", embeddings)):
            if value is not None:
                body[name] = (
                    value.tolist()
                    if isinstance(value, np.ndarray)
                    else [list(map(int, q)) for q in value]
                    if name == "token_ids"
                    else value
                )
        if nprobe is not None:
            body["nprobe"] = nprobe
        return self._call("POST", "/v1/search", json=body)["results"]

    def chunk(self, chunk_id: int) -> dict:
        return self._call("GET", f"/v1/chunks/{int(chunk_id)}")

    def delete_documents(self, doc_ids, reason: str) -> dict:
        """The audit log's entry for this deletion, with the totals after it (needs the admin token)."""
        return self._call("POST", "/v1/documents/delete", json={"doc_ids": [int(d) for d in doc_ids], "reason": reason})

    def restore_documents(self, doc_ids, reason: str) -> dict:
        return self._call(
            "POST", "/v1/documents/restore", json={"doc_ids": [int(d) for d in doc_ids], "reason": reason}
        )

    def deletions(self, since: int = 0, limit: int = 100) -> dict:
        return self._call("GET", "/v1/deletions", params={"since": since, "limit": limit})

    def health(self) -> dict:
        return self._call("GET", "/healthz")


class ServiceRetriever:
    """Asks the index service by LM tokens; the DB's tokenizer and chunk size shape the rows."""

    def __init__(
        self,
        client: IndexClient,
        *,
        k: int = 2,
        chunk_size: int = 64,
        pad_id: int = 0,
        nprobe: int | None = None,
        align: bool = False,
    ):
        self.client, self.k, self.m, self.pad_id, self.nprobe, self.align = client, k, chunk_size, pad_id, nprobe, align

    @classmethod
    def for_db(
        cls, url: str, db: str, *, k: int = 2, nprobe: int | None = None, align: bool = False
    ) -> "ServiceRetriever":
        """A retriever over the service at ``url`` serving ``db`` (read here for its tokenizer and chunk size)."""
        chunk_size = require_stages(db, ("chunks",))["stages"]["chunks"]["config"]["chunk_size"]
        return cls(
            IndexClient(url),
            k=k,
            chunk_size=chunk_size,
            pad_id=special_id(db_tokenizer(db), PAD),
            nprobe=nprobe,
            align=align,
        )

    def __call__(self, chunk_tokens: list[int]) -> Neighbours:
        results = self.client.search(
            token_ids=[chunk_tokens], k=self.k, nprobe=self.nprobe, return_tokens=True, align=self.align
        )[0]
        ids = np.full(self.k, -1, dtype=np.int64)
        distances = np.full(self.k, np.inf, dtype=np.float32)
        shifts = np.zeros(self.k, dtype=np.int64)
        rows = np.full((self.k, 2 * self.m), self.pad_id, dtype=np.int64)
        for j, hit in enumerate(results):
            ids[j], distances[j], shifts[j] = hit["chunk_id"], hit["distance"], hit.get("shift", 0)
            rows[j, : len(hit["tokens"])] = hit["tokens"]
            rows[j, self.m : self.m + len(hit["continuation_tokens"])] = hit["continuation_tokens"]
        return Neighbours(ids, rows, distances, shifts if self.align else None)


def main() -> None:
    from model.generate import build_parser, print_generation  # torch: only this command needs it

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser("Generation in this process with the neighbours the index service at --url finds.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the index service serving --db")
    args = parser.parse_args()
    print_generation(args, functools.partial(ServiceRetriever.for_db, args.url))


if __name__ == "__main__":
    cli.run(main, "index_service.client")
