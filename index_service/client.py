"""A small Python client for the index service (``model.retrieval.ServiceRetriever`` builds on it).

    from index_service.client import IndexClient
    client = IndexClient("http://127.0.0.1:8000")
    client.search(texts=["How do I sort a dict by value?"], k=2)[0][0]["text"]
"""

from __future__ import annotations

import numpy as np
import requests


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

    def search(self, *, texts=None, token_ids=None, embeddings=None, k: int = 10, nprobe: int | None = None,
               return_tokens: bool = False, align: bool = False) -> list[list[dict]]:
        """One list of neighbours per query, nearest first (see ``index_service.api.Neighbour``)."""
        body = {"k": k, "return_tokens": return_tokens, **({"align": True} if align else {})}
        for name, value in (("texts", texts), ("token_ids", token_ids), ("embeddings", embeddings)):
            if value is not None:
                body[name] = value.tolist() if isinstance(value, np.ndarray) else [list(map(int, q)) for q in value] if name == "token_ids" else value
        if nprobe is not None:
            body["nprobe"] = nprobe
        return self._call("POST", "/v1/search", json=body)["results"]

    def chunk(self, chunk_id: int) -> dict:
        return self._call("GET", f"/v1/chunks/{int(chunk_id)}")

    def delete_documents(self, doc_ids, reason: str) -> dict:
        """The audit log's entry for this deletion, with the totals after it (needs the admin token)."""
        return self._call("POST", "/v1/documents/delete", json={"doc_ids": [int(d) for d in doc_ids], "reason": reason})

    def restore_documents(self, doc_ids, reason: str) -> dict:
        return self._call("POST", "/v1/documents/restore", json={"doc_ids": [int(d) for d in doc_ids], "reason": reason})

    def deletions(self, since: int = 0, limit: int = 100) -> dict:
        return self._call("GET", "/v1/deletions", params={"since": since, "limit": limit})

    def health(self) -> dict:
        return self._call("GET", "/healthz")
