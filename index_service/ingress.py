"""The index service's HTTP ingress (FastAPI on Ray Serve): search, chunks, deletions, health, metrics.

    client -> Ingress -> QueryEmbedder (texts/tokens -> vectors), once per batch of text queries
                      -> its own ShardGroup, or ShardSearcher x G (approximate top c = k * rerank_factor
                         of each group), once per batch of searches
              merge by (distance, id), exact re-rank on the memory-mapped vectors, text from the token store

Concurrent requests are batched with ``@serve.batch`` (counted in queries, up to the API's 256 per
request). Each step is the one ``retro_db.search.RetrievalIndex.search`` takes in one process (``search_shards``,
``merge_top_k``, ``rerank``), so the service's answer equals it.
"""

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass

import faiss
import numpy as np
from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from ray import serve

from index_service import api
from index_service.deployments import ShardGroup, replica_name, split_rows
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


def parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    """The body validated by pydantic's own JSON parser: FastAPI's json.loads and then validation
    took 3x as long (64 x 384 floats: 6.3 vs 2.0 ms). Errors keep FastAPI's 422 form."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError([
            {**err, "loc": ("body", *err["loc"]), "msg": f"JSON decode error: {err['msg']}" if err["type"] == "json_invalid" else err["msg"]}
            for err in e.errors()
        ]) from None


def json_body(model: type[BaseModel]) -> dict:
    """OpenAPI for a route that parses its body with ``parse_body``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def json_response(content: dict) -> Response:
    """The handlers build plain JSON types already; FastAPI's encoder and response re-validation
    were the ingress's largest per-request cost. ``response_model`` still documents the schema."""
    return Response(json.dumps(content, separators=(",", ":")), media_type="application/json")


@dataclass
class Retrieval:
    """One search request's query vectors on their way through a batch."""

    vectors: np.ndarray  # (n, d)
    k: int
    c: int  # candidates per shard group: k * rerank_factor
    nprobe: int | None


class GroupUnavailable(RuntimeError):
    """A shard group or the embedder failed mid-request: Serve restarts it, the client retries (503)."""


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(app)
class Ingress:
    """Validates, batches concurrent requests (one embedder call per batch of text queries, one call
    per shard group per batch of searches), merges and re-ranks, and attaches text. With no searcher
    deployments it holds the one shard group itself: an embedding query is then one hop."""

    def __init__(self, db: str, embedder, *searchers, search_threads: int, mmap: bool, max_batch_queries: int,
                 embed_batch_wait_s: float, search_batch_wait_s: float):  # from ServiceConfig (build_app)
        manifest = mf.require_stages(db)
        self.db, self.embedder, self.searchers = db, embedder, list(searchers)
        self.local = None if self.searchers else ShardGroup(db, threads=search_threads, mmap=mmap)
        for method, wait in ((self.embed, embed_batch_wait_s), (self.retrieve, search_batch_wait_s)):
            method.set_max_batch_size(max_batch_queries)
            method.set_batch_wait_timeout_s(wait)
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

    async def _query_vectors(self, request: api.SearchRequest) -> np.ndarray:
        """The request's queries as vectors (n, d); 422 for what only the DB can check."""
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
        return await self.embed(texts)

    # Batches wait for text queries: on a small machine requests reach the ingress more slowly than
    # BERT embeds them one by one, so without a wait nearly every batch held one text (8 clients,
    # 2 cores: 27 q/s with no wait, 35-39 with 10 ms, 38-40 with 20 ms; docs/BENCHMARKS.md).
    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.02, batch_size_fn=lambda batch: sum(len(texts) for texts in batch))
    async def embed(self, batch: list[list[str]]) -> list[np.ndarray]:
        """One embedder call for the text queries of concurrent requests: (n, d) per request."""
        try:
            vectors = await self.embedder.embed.remote([t for texts in batch for t in texts])
        except Exception as e:  # a replica died mid-request
            log.warning("embedding failed: %s", e)
            raise GroupUnavailable(f"embedder: {type(e).__name__}") from None
        return split_rows(vectors, [len(texts) for texts in batch])

    # Up to 4 batches in flight: while one waits for remote shard groups (or searches on a worker
    # thread) the next forms (2 remote groups, 8 clients: 62 q/s with 1 in flight, 107 with 4).
    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.001, max_concurrent_batches=4,
                 batch_size_fn=lambda batch: sum(len(r.vectors) for r in batch))
    async def retrieve(self, batch: list[Retrieval]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top k (distances (n, k), ids (n, k)) per request of a batch of concurrent requests."""
        requests = [(r.vectors, r.c, r.nprobe) for r in batch]
        if self.local is not None:  # one thread hop for search, merge and re-rank
            return await asyncio.to_thread(lambda: self._merge_and_rerank(batch, [self.local.search_many(requests)]))
        try:
            parts = await asyncio.gather(*(s.search.remote(requests) for s in self.searchers))
        except Exception as e:  # a replica died mid-request
            log.warning("search failed: %s", e)
            raise GroupUnavailable(f"shard group: {type(e).__name__}") from None
        return await asyncio.to_thread(self._merge_and_rerank, batch, parts)

    def _merge_and_rerank(self, batch: list[Retrieval], parts: list[list]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for i, r in enumerate(batch):
            dists, ids = merge_top_k([part[i] for part in parts], r.c)
            out.append(rerank(self.vectors, r.vectors, ids, r.k) if self.rerank_factor else (dists[:, : r.k], ids[:, : r.k]))
        return out

    @app.post("/v1/search", response_model=api.SearchResponse, openapi_extra=json_body(api.SearchRequest),
              responses={422: {"description": "Validation Error"}})
    async def search(self, http_request: Request) -> Response:
        """Top-k chunks per query (by text, LM tokens or embedding), each with its text and continuation."""
        request = parse_body(api.SearchRequest, await http_request.body())
        if request.nprobe is not None and request.nprobe > self.nlist:
            raise HTTPException(422, f"nprobe {request.nprobe} exceeds the index's {self.nlist} lists")
        self.refresh()
        try:
            queries = await self._query_vectors(request)
            dists, ids = await self.retrieve(Retrieval(queries, request.k, request.k * max(1, self.rerank_factor), request.nprobe))
        except GroupUnavailable as e:
            raise HTTPException(503, f"unavailable ({e}); retry shortly") from None
        if ids.size <= 100:  # decoding a few chunks costs less than a thread hop
            results = self._results(self.store, dists, ids, request.return_tokens)
        else:
            results = await asyncio.to_thread(self._results, self.store, dists, ids, request.return_tokens)
        return json_response({"results": results})

    def _chunks(self, store: TokenStore, ids: np.ndarray, with_tokens: bool) -> list[dict]:
        """Each chunk's id, document, text and continuation (and their LM tokens)."""
        tokens, lengths = store.chunks(ids)
        cont, cont_lengths = store.continuations(ids, self.pad_id)
        docs = store.doc_of(ids).tolist()
        # A continuation is the next chunk's text, and the neighbours of a request's queries overlap:
        # each distinct chunk is decoded once (64 queries x 10 neighbours: 10.5 -> 7.5 ms here).
        keys = np.concatenate([ids, np.where(cont_lengths > 0, ids + 1, -1)])
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        all_tokens, all_lengths = np.concatenate([tokens, cont]), np.concatenate([lengths, cont_lengths])
        decoded = self.tokenizer.decode_batch([all_tokens[f, : all_lengths[f]].tolist() for f in first], skip_special_tokens=False)
        texts = [decoded[j] for j in inverse.tolist()]
        out = []
        for j, cid in enumerate(ids.tolist()):
            item = {"chunk_id": cid, "doc_id": docs[j], "text": texts[j], "continuation": texts[len(ids) + j]}
            if with_tokens:
                item["tokens"], item["continuation_tokens"] = tokens[j, : lengths[j]].tolist(), cont[j, : cont_lengths[j]].tolist()
            out.append(item)
        return out

    def _results(self, store: TokenStore, dists: np.ndarray, ids: np.ndarray, with_tokens: bool) -> list[list[dict]]:
        """One list per query of its found chunks, nearest first, with their distances."""
        found = ids >= 0
        chunks = iter(self._chunks(store, ids[found], with_tokens) if found.any() else [])
        return [[{**next(chunks), "distance": d} for d in row[keep].tolist()] for row, keep in zip(dists, found)]

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
        return self._chunks(self.store, np.array([chunk_id]), with_tokens=True)[0]

    @app.post("/v1/documents/delete", response_model=api.DeleteResponse)
    async def delete(self, request: api.DeleteRequest) -> dict:
        """Removes documents from every search (persisted in the DB; every replica sees it on its next request)."""
        self.refresh()
        try:
            counts = await asyncio.to_thread(deletions.delete_documents, self.db, request.doc_ids, self.store)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from None
        return counts  # every reader, this one included, refreshes before it answers

    async def _group_stats(self) -> list[dict]:
        if self.local is not None:
            return [{**self.local.stats(), "replica": replica_name()}]
        return await asyncio.gather(*(s.stats.remote() for s in self.searchers))

    @app.get("/healthz", response_model=api.Health)
    async def healthz(self) -> dict:
        try:
            groups = await asyncio.wait_for(self._group_stats(), timeout=10)
        except Exception as e:
            raise HTTPException(503, f"shard groups are not answering ({type(e).__name__})") from None
        return {"status": "ok", "vectors": sum(g["vectors"] for g in groups), "index_shards": sum(g["index_shards"] for g in groups),
                "shard_groups": groups, "deleted_chunks": max(g["deleted_chunks"] for g in groups),
                "increments": len(mf.read_manifest(self.db).get("increments", []))}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> str:
        """Prometheus text format: requests by endpoint and status, latency histogram, queries by kind."""
        return generate_latest(_metrics()["registry"]).decode()
