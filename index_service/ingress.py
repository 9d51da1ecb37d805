"""The index service's HTTP ingress (FastAPI on Ray Serve): search, chunks, deletions, health, metrics.

    client -> Ingress -> QueryEmbedder (texts/tokens -> vectors)
                      -> ShardSearcher x G (approximate top c = k * rerank_factor of each group)
              merge by (distance, id), exact re-rank on the memory-mapped vectors, text from the token store

Each step is the one ``retro_db.search.RetrievalIndex.search`` takes in one process (``search_shards``,
``merge_top_k``, ``rerank``), so the service's answer equals it.
"""

import asyncio
import json
import logging
import os
import time

import faiss
import numpy as np
from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from ray import serve

from index_service import api
from retro_db import deletions, layout
from retro_db import manifest as mf
from retro_db.search import load_indexed_vectors, merge_top_k, rerank
from retro_db.token_store import TokenStore
from retro_db.tokenizer import PAD, db_tokenizer, special_id

log = logging.getLogger("index_service")

app = FastAPI(
    title="RETRO index service",
    version="1",
    description="Nearest chunks of the RETRO retrieval database, with their text and continuation.",
)
METRICS = None


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError):
    """422 with where and what, without echoing the input (it may be huge, or hold NaN, which JSON cannot carry)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": detail})


def _metrics():
    """Prometheus metrics of this ingress replica (created in the replica's process)."""
    global METRICS
    if METRICS is None:
        registry = CollectorRegistry()
        METRICS = {
            "registry": registry,
            "requests": Counter("retro_index_requests", "HTTP requests", ["endpoint", "status"], registry=registry),
            "seconds": Histogram("retro_index_request_seconds", "request latency", ["endpoint"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
            "queries": Counter("retro_index_queries", "queries searched", ["kind"], registry=registry),
        }
    return METRICS


class RequestMetrics:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware costs a task and a stream per request):
    counts requests by route and status and observes their latency."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_with_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            metrics = _metrics()
            metrics["requests"].labels(endpoint, str(status[0])).inc()
            metrics["seconds"].labels(endpoint).observe(time.perf_counter() - t0)


app.add_middleware(RequestMetrics)


def json_response(content: dict) -> Response:
    """The handlers build plain JSON types already; FastAPI's encoder and response re-validation
    were the ingress's largest per-request cost. ``response_model`` still documents the schema."""
    return Response(json.dumps(content, separators=(",", ":")), media_type="application/json")


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(app)
class Ingress:
    def __init__(self, db: str, embedder, *searchers):
        manifest = mf.require_stages(db)
        self.db, self.embedder, self.searchers = db, embedder, list(searchers)
        self.tokenizer = db_tokenizer(db)
        self.pad_id, self.vocab_size = special_id(self.tokenizer, PAD), self.tokenizer.get_vocab_size()
        self.dim = manifest["stages"]["embeddings"]["dim"]
        trained = faiss.read_index(layout.trained_index_path(db))
        self.nlist = faiss.extract_index_ivf(trained).nlist
        self._manifest_sig = self._deleted_sig = None
        self.refresh()

    def refresh(self) -> None:
        sig = mf.stat_signature(layout.manifest_path(self.db))
        if sig != self._manifest_sig:  # increments add token shards and vectors
            self.store, self.vectors = TokenStore(self.db), load_indexed_vectors(self.db)
            self.rerank_factor = mf.read_manifest(self.db)["stages"]["index"]["config"].get("rerank_factor", 4)
            self._manifest_sig = sig
        dsig = deletions.deletions_signature(self.db)
        if dsig != self._deleted_sig:
            self.deleted_docs, self._deleted_sig = set(deletions.deleted_doc_ids(self.db).tolist()), dsig

    def _decode(self, tokens: np.ndarray, length: int) -> tuple[str, list[int]]:
        ids = [int(t) for t in tokens[:length]]
        return self.tokenizer.decode(ids, skip_special_tokens=False), ids

    async def _query_vectors(self, request: api.SearchRequest) -> np.ndarray:
        if request.embeddings is not None:
            bad = [i for i, v in enumerate(request.embeddings) if len(v) != self.dim]
            if bad:
                raise HTTPException(422, f"embeddings[{bad[0]}] has {len(request.embeddings[bad[0]])} values; the index holds {self.dim}-d vectors")
            _metrics()["queries"].labels("embeddings").inc(len(request.embeddings))
            return np.asarray(request.embeddings, dtype=np.float32)
        if request.token_ids is not None:
            bad = [i for i, ids in enumerate(request.token_ids) if max(ids) >= self.vocab_size]
            if bad:
                raise HTTPException(422, f"token_ids[{bad[0]}] holds an id >= the LM vocabulary size {self.vocab_size}")
            texts = self.tokenizer.decode_batch(request.token_ids, skip_special_tokens=False)
            _metrics()["queries"].labels("token_ids").inc(len(texts))
        else:
            texts = request.texts
            _metrics()["queries"].labels("texts").inc(len(texts))
        return await self.embedder.embed.remote(texts)

    @app.post("/v1/search", response_model=api.SearchResponse)
    async def search(self, request: api.SearchRequest) -> Response:
        """Top-k chunks per query (by text, LM tokens or embedding), each with its text and continuation."""
        if request.nprobe is not None and request.nprobe > self.nlist:
            raise HTTPException(422, f"nprobe {request.nprobe} exceeds the index's {self.nlist} lists")
        queries = await self._query_vectors(request)

        self.refresh()
        c = request.k * max(1, self.rerank_factor)
        try:
            parts = await asyncio.gather(*(s.search.remote((queries, c, request.nprobe)) for s in self.searchers))
        except Exception as e:  # a replica died mid-request: Serve restarts it, the client retries
            log.warning("search failed: %s", e)
            raise HTTPException(503, f"a shard group is unavailable ({type(e).__name__}); retry shortly") from None
        dists, ids = merge_top_k(parts, c)
        if self.rerank_factor:
            dists, ids = await asyncio.to_thread(rerank, self.vectors, queries, ids, request.k)
        else:
            dists, ids = dists[:, : request.k], ids[:, : request.k]
        return json_response({"results": [self._neighbours(d, i, request.return_tokens) for d, i in zip(dists, ids)]})

    def _chunks(self, ids: np.ndarray, with_tokens: bool) -> list[dict]:
        """Each chunk's id, document, text and continuation (and their LM tokens)."""
        tokens, lengths = self.store.chunks(ids)
        cont, cont_lengths = self.store.continuations(ids, self.pad_id)
        docs = self.store.doc_of(ids)
        out = []
        for j, cid in enumerate(ids):
            text, toks = self._decode(tokens[j], lengths[j])
            cont_text, cont_toks = self._decode(cont[j], cont_lengths[j])
            item = {"chunk_id": int(cid), "doc_id": int(docs[j]), "text": text, "continuation": cont_text}
            if with_tokens:
                item["tokens"], item["continuation_tokens"] = toks, cont_toks
            out.append(item)
        return out

    def _neighbours(self, dists: np.ndarray, ids: np.ndarray, with_tokens: bool) -> list[dict]:
        found = ids >= 0
        if not found.any():
            return []
        return [{**item, "distance": float(d)} for item, d in zip(self._chunks(ids[found], with_tokens), dists[found])]

    @app.get("/v1/chunks/{chunk_id}", response_model=api.Chunk)
    async def chunk(self, chunk_id: int = Path(ge=0, le=api.MAX_ID)) -> dict:
        """One chunk by id, with its continuation; 404 for unknown or deleted chunks."""
        self.refresh()
        try:
            doc = int(self.store.doc_of([chunk_id])[0])
        except KeyError:
            raise HTTPException(404, f"chunk {chunk_id} does not exist in {os.path.basename(os.path.abspath(self.db))}") from None
        if doc in self.deleted_docs:
            raise HTTPException(404, f"chunk {chunk_id} belongs to document {doc}, which was deleted")
        return self._chunks(np.array([chunk_id]), with_tokens=True)[0]

    @app.post("/v1/documents/delete", response_model=api.DeleteResponse)
    async def delete(self, request: api.DeleteRequest) -> dict:
        """Removes documents from every search (persisted in the DB; every replica sees it on its next request)."""
        self.refresh()
        try:
            counts = await asyncio.to_thread(deletions.delete_documents, self.db, request.doc_ids, self.store)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from None
        return counts  # every reader, this one included, refreshes before it answers

    @app.get("/healthz", response_model=api.Health)
    async def healthz(self) -> dict:
        try:
            groups = await asyncio.wait_for(asyncio.gather(*(s.stats.remote() for s in self.searchers)), timeout=10)
        except Exception as e:
            raise HTTPException(503, f"shard groups are not answering ({type(e).__name__})") from None
        return {"status": "ok", "vectors": sum(g["vectors"] for g in groups), "index_shards": sum(g["index_shards"] for g in groups),
                "shard_groups": groups, "deleted_chunks": max(g["deleted_chunks"] for g in groups),
                "increments": len(mf.read_manifest(self.db).get("increments", []))}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> str:
        """Prometheus text format: requests by endpoint and status, latency histogram, queries by kind."""
        return generate_latest(_metrics()["registry"]).decode()
