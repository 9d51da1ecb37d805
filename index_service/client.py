"""A small Python client for the index service, and the retriever that model generation uses.

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
    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout: float = 60.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()

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
               return_tokens: bool = False) -> list[list[dict]]:
        """One list of neighbours per query, nearest first (see ``index_service.api.Neighbour``)."""
        body = {"k": k, "return_tokens": return_tokens}
        for name, value in (("texts", texts), ("token_ids", token_ids), ("embeddings", embeddings)):
            if value is not None:
                body[name] = value.tolist() if isinstance(value, np.ndarray) else [list(map(int, q)) for q in value] if name == "token_ids" else value
        if nprobe is not None:
            body["nprobe"] = nprobe
        return self._call("POST", "/v1/search", json=body)["results"]

    def chunk(self, chunk_id: int) -> dict:
        return self._call("GET", f"/v1/chunks/{int(chunk_id)}")

    def delete_documents(self, doc_ids) -> dict:
        return self._call("POST", "/v1/documents/delete", json={"doc_ids": [int(d) for d in doc_ids]})

    def health(self) -> dict:
        return self._call("GET", "/healthz")


class ServiceRetriever:
    """``model.generate``'s retriever over the service: chunk tokens -> (ids (k,), [N, F] tokens (k, 2m))."""

    def __init__(self, client: IndexClient, *, k: int = 2, chunk_size: int = 64, pad_id: int = 0, nprobe: int | None = None):
        self.client, self.k, self.m, self.pad_id, self.nprobe = client, k, chunk_size, pad_id, nprobe

    def __call__(self, chunk_tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        results = self.client.search(token_ids=[chunk_tokens], k=self.k, nprobe=self.nprobe, return_tokens=True)[0]
        ids = np.full(self.k, -1, dtype=np.int64)
        rows = np.full((self.k, 2 * self.m), self.pad_id, dtype=np.int64)
        for j, hit in enumerate(results):
            ids[j] = hit["chunk_id"]
            rows[j, : len(hit["tokens"])] = hit["tokens"]
            rows[j, self.m : self.m + len(hit["continuation_tokens"])] = hit["continuation_tokens"]
        return ids, rows
