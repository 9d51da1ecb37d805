"""The index service's HTTP ingress (FastAPI on Ray Serve): search, chunks, deletions, health, metrics,
and, when a checkpoint is served, generation, per-token explanation and the page at ``/``.

Reads are open unless a read token is configured; deleting and restoring documents need the admin
bearer token (``index_service.auth``) and are appended to the DB's audit log (``retro_db.deletions``).
The OpenAPI schema at ``/openapi.json`` is this DB's: its embedding length, vocabulary and nprobe
limits are in it, so a request the schema allows is one the service accepts.

    client -> Ingress -> QueryEmbedder (texts/tokens -> vectors), once per batch of text queries
                      -> its own ShardGroup, or ShardSearcher x G (approximate top c = k * rerank_factor
                         of each group), once per batch of searches
              merge by (distance, id), exact re-rank on the memory-mapped vectors, text from the token store
                      -> LanguageModel (with RUN): tokens up to the next chunk boundary, then the ingress
                         retrieves for the completed chunk through the two hops above, and so on

Concurrent requests are batched with ``@serve.batch`` (counted in queries, up to the API's 256 per
request). Each step is the one ``retro_db.search.RetrievalIndex.search`` takes in one process (``search_shards``,
``merge_top_k``, ``rerank``), so the service's answer equals it.
"""

import asyncio
import copy
import logging
import os
import time
from dataclasses import dataclass

import faiss
import numpy as np
import orjson
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from ray import serve

from index_service import api, auth
from index_service.deployments import ShardGroup, replica_name, split_rows
from model.generate import window_start
from retro_db import deletions, layout
from retro_db import manifest as mf
from retro_db.documents import DocumentCatalog
from retro_db.embedder import chunk_texts
from retro_db.search import load_indexed_vectors, merge_top_k, rerank
from retro_db.token_store import ShardedRows, TokenStore
from retro_db.tokenizer import EOS, PAD, TokenDecoder, db_tokenizer, special_id, token_texts

log = logging.getLogger("index_service")

app = FastAPI(
    title="RETRO index service",
    version="1",
    description="Nearest chunks of the RETRO retrieval database, with their text and continuation.",
)
METRICS = None
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page")
app.mount("/static", StaticFiles(directory=PAGE), name="static")
MODEL_ROUTES = ("/v1/generate", "/v1/explain")


def this_ingress() -> "Ingress":
    """The replica's Ingress: where the middleware, auth and schema below find its settings (Serve
    serves a copy of ``app`` unpickled in the replica: what ``__init__`` set on this module's
    ``app.state`` or globals was not what the served copy's functions saw)."""
    return serve.get_replica_context().servable_object


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


class BodyLimit:
    """413 for a request body over the service's ``max_body_bytes``: by its Content-Length before anything
    is read, else while it streams in (the handler's read raises)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = this_ingress().max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await too_large(limit)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, too_large_detail(limit))
            return message

        await self.app(scope, counted, send)


def too_large_detail(limit: int) -> str:
    return f"request body over {limit} bytes (the service's max_body_bytes)"


def too_large(limit: int) -> JSONResponse:
    return JSONResponse(status_code=413, content={"detail": too_large_detail(limit)})


app.add_middleware(RequestMetrics)
app.add_middleware(BodyLimit)  # added last, so it runs first


def db_openapi() -> dict:
    """FastAPI's schema with this DB's search limits in it, and auth declared where it is required."""
    if app.openapi_schema is None:
        schema = copy.deepcopy(FastAPI.openapi(app))
        content = schema["paths"]["/v1/search"]["post"]["requestBody"]["content"]["application/json"]
        ingress = this_ingress()
        content["schema"] = ingress.search_model.model_json_schema()
        if not ingress.tokens.read:  # reads are open: a client needs no token
            for method, path in READ_ROUTES:
                schema["paths"][path][method].pop("security", None)
        if ingress.model is None:  # the index alone: no model routes to call
            for path in MODEL_ROUTES:
                schema["paths"].pop(path)
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = db_openapi

bearer = HTTPBearer(auto_error=False, description="the admin token (RETRO_ADMIN_TOKEN); for reads, a read token where one is configured")
READ_ROUTES = (("post", "/v1/search"), ("get", "/v1/chunks/{chunk_id}"), ("get", "/v1/deletions"), ("get", "/v1/info"),
               ("post", "/v1/generate"), ("post", "/v1/explain"))


def _presented(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


async def admin(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> str:
    """The audit log's name for the caller of a mutating endpoint: 403 where none is configured, 401 without a valid one."""
    tokens = this_ingress().tokens
    if not tokens.admin:
        raise HTTPException(403, f"deleting and restoring documents is disabled on this service: start it with {auth.ADMIN_ENV} set "
                                 "or --admin-token-file (see README, Serving the index)")
    name = auth.match(_presented(credentials), tokens.admin)
    if name is None:
        raise HTTPException(401, "this needs the admin token: Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})
    return f"token:{name}"


async def reader(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    """Reads are open unless read tokens are configured; then a read or an admin token is needed."""
    tokens = this_ingress().tokens
    if tokens.read and auth.match(_presented(credentials), tokens.read) is None and auth.match(_presented(credentials), tokens.admin) is None:
        raise HTTPException(401, "this service needs a read token: Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})


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
    were the ingress's largest per-request cost, and orjson encodes 64 queries' answers in 0.09 ms
    against json's 2.1. ``response_model`` still documents the schema."""
    return Response(orjson.dumps(content), media_type="application/json")


@dataclass(frozen=True)
class DBView:
    """What one version of the manifest serves, swapped whole, so that a request never mixes two."""

    store: TokenStore
    vectors: ShardedRows  # what re-ranking reads
    rerank_factor: int
    documents: DocumentCatalog


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
                 embed_batch_wait_s: float, search_batch_wait_s: float, admin_token_file: str, read_token_file: str,
                 max_body_bytes: int, model=None, model_info: dict | None = None):  # from ServiceConfig (build_app)
        manifest = mf.require_stages(db)
        self.tokens, self.max_body_bytes = auth.Tokens.load(admin_token_file, read_token_file), max_body_bytes
        self.db, self.embedder, self.searchers = db, embedder, list(searchers)
        self.model, self.model_info = model, model_info
        self.local = None if self.searchers else ShardGroup(db, threads=search_threads, mmap=mmap)
        for method, wait in ((self.embed, embed_batch_wait_s), (self.retrieve, search_batch_wait_s)):
            method.set_max_batch_size(max_batch_queries)
            method.set_batch_wait_timeout_s(wait)
        self.tokenizer = db_tokenizer(db)
        self.decoder = TokenDecoder(self.tokenizer)
        self.pad_id, self.eos_id, self.vocab_size = special_id(self.tokenizer, PAD), special_id(self.tokenizer, EOS), self.tokenizer.get_vocab_size()
        self.dim = manifest["stages"]["embeddings"]["dim"]
        trained = faiss.read_index(layout.trained_index_path(db))
        self.nlist = faiss.extract_index_ivf(trained).nlist
        self.search_model = api.search_request_model(dim=self.dim, vocab_size=self.vocab_size, nlist=self.nlist)
        self._manifest_sig = self._deleted_sig = None
        self.refresh()
        try:  # a change killed between the audit log and the deleted list is completed now
            deletions.recover(db, self.view.store)
        except OSError as e:
            log.warning("%s is not writable (%s): deletions are served as they are, and cannot change here", layout.DELETED, e)

    def refresh(self) -> None:
        sig = mf.stat_signature(layout.manifest_path(self.db))
        if sig != self._manifest_sig:  # increments add token shards and vectors
            rerank_factor = mf.read_manifest(self.db)["stages"]["index"]["config"].get("rerank_factor", 4)
            self.view = DBView(TokenStore(self.db), load_indexed_vectors(self.db), rerank_factor, DocumentCatalog(self.db))
            self._manifest_sig = sig
        dsig = deletions.deletions_signature(self.db)
        if dsig != self._deleted_sig:
            self.deleted_docs, self._deleted_sig = set(deletions.deleted_doc_ids(self.db).tolist()), dsig

    def current_view(self, ids: np.ndarray) -> DBView:
        """The view that knows every one of ``ids``: a shard group can load an increment a moment
        before this replica sees the manifest that registers it (then it is reread, not a 500)."""
        found = ids[ids >= 0]
        view = self.view
        if found.size and found.max() >= len(view.vectors):
            self.refresh()
            view = self.view
        return view

    async def _query_vectors(self, request: api.SearchRequest) -> np.ndarray:
        """The request's queries as vectors (n, d) (the request was validated against this DB's limits)."""
        if request.embeddings is not None:
            _metrics()["queries"].labels("embeddings").inc(len(request.embeddings))
            return np.asarray(request.embeddings, dtype=np.float32)
        if request.token_ids is not None:
            texts = chunk_texts(self.tokenizer, request.token_ids)  # as the DB embedded its chunks
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
        return split_rows(await self.embed_now([t for texts in batch for t in texts]), [len(texts) for texts in batch])

    async def embed_now(self, texts: list[str]) -> np.ndarray:
        """texts -> (n, d) in one embedder call, without the ingress's batch wait (the embedder still
        batches concurrent calls): generation and explanation wait on their retrievals, and with the
        20 ms wait an explanation took 1.66x its in-process time here, without it 1.02x (docs/BENCHMARKS.md)."""
        try:
            return await self.embedder.embed.remote(texts)
        except Exception as e:  # a replica died mid-request
            log.warning("embedding failed: %s", e)
            raise GroupUnavailable(f"embedder: {type(e).__name__}") from None

    # Up to 4 batches in flight: while one waits for remote shard groups (or searches on a worker
    # thread) the next forms (2 remote groups, 8 clients: 62 q/s with 1 in flight, 107 with 4).
    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.001, max_concurrent_batches=4,
                 batch_size_fn=lambda batch: sum(len(r.vectors) for r in batch))
    async def retrieve(self, batch: list[Retrieval]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top k (distances (n, k), ids (n, k)) per request of a batch of concurrent requests."""
        requests = [(r.vectors, r.c, r.nprobe) for r in batch]
        if self.local is not None:
            parts = [await self.local.search(requests)]
        else:
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
            view = self.current_view(ids)
            out.append(rerank(view.vectors, r.vectors, ids, r.k) if view.rerank_factor else (dists[:, : r.k], ids[:, : r.k]))
        return out

    @app.post("/v1/search", response_model=api.SearchResponse, openapi_extra=json_body(api.SearchRequest),
              dependencies=[Depends(reader)], responses=api.errors(401, 413, 422, 503))
    async def search(self, http_request: Request) -> Response:
        """Top-k chunks per query (by text, LM tokens or embedding), each with its text and continuation."""
        request = parse_body(self.search_model, await http_request.body())
        self.refresh()
        try:
            queries = await self._query_vectors(request)
            dists, ids = await self.retrieve(Retrieval(queries, request.k, request.k * max(1, self.view.rerank_factor), request.nprobe))
        except GroupUnavailable as e:
            raise HTTPException(503, f"unavailable ({e}); retry shortly") from None
        store = self.view.store  # retrieve's re-rank moved the view on if its ids needed a newer one
        if ids.size <= 100:  # decoding a few chunks costs less than a thread hop
            results = self._results(store, dists, ids, request.return_tokens)
        else:
            results = await asyncio.to_thread(self._results, store, dists, ids, request.return_tokens)
        if request.align:
            await asyncio.to_thread(self._align_results, store, results, ids, request.token_ids, request.return_tokens)
        return json_response({"results": results})

    def _align_results(self, store: TokenStore, results: list[list[dict]], ids: np.ndarray, queries: list[list[int]], with_tokens: bool) -> None:
        """Moves each result's window to line up with its query (``TokenStore.aligned_neighbour_tokens``), in place."""
        m = store.chunk_size
        for found, row, query in zip(results, ids, queries):
            row = row[row >= 0]
            rows, shifts = store.aligned_neighbour_tokens(row, [np.asarray(query)] * len(row), self.pad_id)
            for hit, window, shift in zip(found, rows, shifts.tolist()):
                hit["shift"] = shift
                if shift:
                    hit.update(self._window(window, m, with_tokens))

    def _window(self, window: np.ndarray, m: int, with_tokens: bool) -> dict:
        """text and continuation (and their tokens) of an [N, F] row (2m,)."""
        n, f = ([int(t) for t in part if t != self.pad_id] for part in (window[:m], window[m:]))
        text, continuation = self.tokenizer.decode_batch([n, f], skip_special_tokens=False)
        return {"text": text, "continuation": continuation, **({"tokens": n, "continuation_tokens": f} if with_tokens else {})}

    def _chunks(self, store: TokenStore, ids: np.ndarray, with_tokens: bool) -> list[dict]:
        """Each chunk's id, document, text and continuation (and their LM tokens)."""
        tokens, lengths = store.chunks(ids)
        cont, cont_lengths = store.continuations(ids, self.pad_id)
        docs = store.doc_of(ids).tolist()
        # A continuation is the next chunk's text, and the neighbours of a request's queries overlap:
        # each distinct chunk is decoded once (64 queries x 10 neighbours: 10.5 -> 7.5 ms here, before TokenDecoder).
        keys = np.concatenate([ids, np.where(cont_lengths > 0, ids + 1, -1)])
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        decoded = self.decoder.decode(np.concatenate([tokens, cont])[first], np.concatenate([lengths, cont_lengths])[first])
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

    @app.get("/v1/chunks/{chunk_id}", response_model=api.Chunk, dependencies=[Depends(reader)], responses=api.errors(401, 404, 422))
    async def chunk(self, chunk_id: int = Path(ge=0, le=api.MAX_ID)) -> dict:
        """One chunk by id, with its continuation; 404 for unknown or deleted chunks."""
        self.refresh()
        store = self.view.store
        try:
            doc = int(store.doc_of([chunk_id])[0])
        except KeyError:
            raise HTTPException(404, f"chunk {chunk_id} does not exist in {os.path.basename(os.path.abspath(self.db))}") from None
        if doc in self.deleted_docs:
            raise HTTPException(404, f"chunk {chunk_id} belongs to document {doc}, which was deleted")
        return self._chunks(store, np.array([chunk_id]), with_tokens=True)[0]

    async def _change(self, action: str, request: api.DocumentsRequest, actor: str) -> dict:
        self.refresh()
        try:
            return await asyncio.to_thread(deletions.change, self.db, request.doc_ids, self.view.store, action=action,
                                           reason=request.reason, actor=actor)
        except deletions.UnknownDocuments as e:
            raise HTTPException(404, str(e)) from None
        except deletions.NotDeleted as e:
            raise HTTPException(409, str(e)) from None
        except ValueError as e:  # what the schema cannot say (a reason of blanks only)
            raise HTTPException(422, str(e)) from None
        except OSError as e:  # a read-only DB/deleted: the deployment's volume layout, not the client's fault
            log.error("cannot record a %s in %s: %s", action, layout.DELETED, e)
            raise HTTPException(403, f"this deployment cannot change its deletions ({layout.DELETED}/ is not writable here)") from None

    # Bodies parsed after the token is checked: a caller without it learns nothing from a 422.
    @app.post("/v1/documents/delete", response_model=api.ChangeResponse, openapi_extra=json_body(api.DocumentsRequest),
              responses=api.errors(401, 403, 404, 413, 422))
    async def delete(self, http_request: Request, actor: str = Depends(admin)) -> dict:
        """Removes documents from every search and from training (persisted and audited; every replica
        sees it on its next request). Needs the admin token."""
        return await self._change(deletions.DELETE, parse_body(api.DocumentsRequest, await http_request.body()), actor)

    @app.post("/v1/documents/restore", response_model=api.ChangeResponse, openapi_extra=json_body(api.DocumentsRequest),
              responses=api.errors(401, 403, 404, 409, 413, 422))
    async def restore(self, http_request: Request, actor: str = Depends(admin)) -> dict:
        """Undoes a deletion: the documents are searched (and trained on) again. Audited; needs the admin token."""
        return await self._change(deletions.RESTORE, parse_body(api.DocumentsRequest, await http_request.body()), actor)

    @app.get("/v1/deletions", response_model=api.DeletionsResponse, dependencies=[Depends(reader)], responses=api.errors(401, 422))
    async def deletion_log(self, since: int = Query(0, ge=0, le=api.MAX_ID, description="entries after this seq"),
                        limit: int = Query(100, ge=1, le=1000, description="at most this many entries")) -> dict:
        """The audit log of deletions and restorations, oldest first, and what is deleted now."""
        entries = await asyncio.to_thread(deletions.audit_log, self.db, since=since, limit=limit)
        docs, chunks = deletions.deleted(self.db)
        return {"entries": entries, "total_documents_deleted": len(docs), "total_chunks_deleted": len(chunks)}

    # --- the served model (RUN): generation and explanation, retrieving through the batches above ---

    def _require_model(self) -> None:
        if self.model is None:
            raise HTTPException(404, "this service serves no model: start it with a checkpoint (make serve RUN=runs/default, "
                                     "or --run <checkpoint or run directory>)")

    async def _retrieve_for_chunks(self, chunks: list[list[int]], k: int) -> list[dict]:
        """Each chunk's k nearest DB chunks, as a token query of /v1/search would find them (with align
        when the model has align_neighbours): {ids (k,), distances (k,), rows: [N, F] tokens (k, 2m)[, shifts (k,)]} per chunk."""
        if not chunks:
            return []
        self.refresh()
        vectors = await self.embed_now(chunk_texts(self.tokenizer, chunks))
        dists, ids = await self.retrieve(Retrieval(vectors, k, k * max(1, self.view.rerank_factor), None))
        view = self.current_view(ids)
        if not self.model_info.get("align_neighbours"):
            return [{"ids": i, "distances": d, "rows": view.store.neighbour_tokens(i, self.pad_id), "view": view} for d, i in zip(dists, ids)]
        out = []
        for d, i, chunk in zip(dists, ids, chunks):
            rows, shifts = view.store.aligned_neighbour_tokens(i, [np.asarray(chunk)] * len(i), self.pad_id)
            out.append({"ids": i, "distances": d, "rows": rows, "shifts": shifts, "view": view})
        return out

    def _neighbours(self, hit: dict | None) -> list[dict]:
        """A chunk's retrieved neighbours with their text, continuation and source document."""
        if hit is None:
            return []
        found = hit["ids"] >= 0
        ids, view = hit["ids"][found], hit["view"]
        if not ids.size:
            return []
        chunks = self._chunks(view.store, ids, with_tokens=False)
        shifts = hit["shifts"][found].tolist() if "shifts" in hit else [0] * len(chunks)
        for c, window, shift in zip(chunks, hit["rows"][found], shifts):  # the window the model read
            c["shift"] = shift
            if shift:
                c.update(self._window(window, view.store.chunk_size, with_tokens=False))
        sources = view.documents.describe([c["doc_id"] for c in chunks])
        return [{**c, "distance": float(d), "source": sources.get(c["doc_id"], {"doc_id": c["doc_id"], "source": "", "position": -1, "meta": {}})}
                for c, d in zip(chunks, hit["distances"][found].tolist())]

    def _text_chunks(self, pieces: list[str], hits: dict[int, dict]) -> list[dict]:
        m = self.model_info["chunk_size"]
        return [{"index": u, "start": u * m, "text": "".join(pieces[u * m : (u + 1) * m]), "neighbours": self._neighbours(hits.get(u - 1))}
                for u in range(-(-len(pieces) // m))]

    @staticmethod
    def _scores(pieces: list[str], on: np.ndarray, off: np.ndarray) -> list[dict]:
        return [{"text": p, "logprob": None if np.isnan(a) else a, "logprob_no_retrieval": None if np.isnan(b) else b}
                for p, a, b in zip(pieces, on.tolist(), off.tolist())]

    def _window_rows(self, hits: dict[int, dict], next_position: int) -> dict[int, np.ndarray]:
        """The rows of the chunks in the context of the next token (what the model call needs)."""
        first = window_start(next_position // self.model_info["chunk_size"], self.model_info["max_chunks"])
        return {u: h["rows"] for u, h in hits.items() if u >= first}

    async def _model_call(self, method: str, *args, **kwargs):
        try:
            return await getattr(self.model, method).remote(*args, **kwargs)
        except Exception as e:  # a model replica died mid-request: Serve restarts it
            log.warning("model %s failed: %s", method, e)
            raise GroupUnavailable(f"model: {type(e).__name__}") from None

    @app.post("/v1/generate", response_model=api.GenerateResponse, openapi_extra=json_body(api.GenerateRequest),
              dependencies=[Depends(reader)], responses=api.errors(401, 404, 413, 422, 503))
    async def generate(self, http_request: Request) -> Response:
        """Continues the prompt, retrieving at every chunk boundary; each chunk comes with the neighbours
        that conditioned it. The same request (seed included) gives the same text."""
        request = parse_body(api.GenerateRequest, await http_request.body())
        self._require_model()
        prompt = self.tokenizer.encode(request.prompt).ids  # never empty: byte-level BPE gives a token per byte at worst
        info, m = self.model_info, self.model_info["chunk_size"]
        k, use = request.k or info["k"], request.retrieval and info["retrieval"]
        tokens, hits, end = list(prompt), {}, len(prompt) + request.max_new_tokens

        async def retrieve_up_to(last: int, first: int = 0) -> None:  # chunks first..last-1, once each
            todo = [u for u in range(first, last) if u not in hits] if use else []
            hits.update(zip(todo, await self._retrieve_for_chunks([tokens[u * m : (u + 1) * m] for u in todo], k)))

        try:
            while len(tokens) < end:
                # the completed chunks in the next token's context (those before it condition nothing)
                await retrieve_up_to(len(tokens) // m, window_start(len(tokens) // m, info["max_chunks"]))
                n = min(end - len(tokens), m - len(tokens) % m)  # up to the next chunk boundary
                new = await self._model_call("extend", tokens, self._window_rows(hits, len(tokens)), n, temperature=request.temperature,
                                             top_k=request.top_k, seed=request.seed, stop_id=self.eos_id)
                tokens += new
                if new and new[-1] == self.eos_id:
                    break
            scores = None
            if request.explain:  # every chunk's neighbours, as /v1/explain of this text would score it
                await retrieve_up_to((len(tokens) - 1) // m)
                scores = await self._model_call("score", tokens, {u: h["rows"] for u, h in hits.items()})
        except GroupUnavailable as e:
            raise HTTPException(503, f"unavailable ({e}); retry shortly") from None
        pieces = token_texts(self.tokenizer, tokens)
        body = {"text": self.tokenizer.decode(tokens[len(prompt):]), "prompt_tokens": len(prompt), "generated_tokens": len(tokens) - len(prompt),
                "chunks": await asyncio.to_thread(self._text_chunks, pieces, hits)}
        if scores is not None:
            body["tokens"] = self._scores(pieces, *scores)
        return json_response(body)

    @app.post("/v1/explain", response_model=api.ExplainResponse, openapi_extra=json_body(api.ExplainRequest),
              dependencies=[Depends(reader)], responses=api.errors(401, 404, 413, 422, 503))
    async def explain(self, http_request: Request) -> Response:
        """Every token's log-probability with and without retrieval, and each chunk's neighbours (the
        paper's Tables 16-19): where retrieval raised or lowered the model's belief, and from what text."""
        request = parse_body(api.ExplainRequest, await http_request.body())
        self._require_model()
        tokens = self.tokenizer.encode(request.text).ids
        m = self.model_info["chunk_size"]
        # chunk u's neighbours condition chunk u+1: a chunk with no token after it retrieves nothing
        todo = list(range((len(tokens) - 1) // m)) if self.model_info["retrieval"] else []
        try:
            found = await self._retrieve_for_chunks([tokens[u * m : (u + 1) * m] for u in todo], request.k or self.model_info["k"])
            hits = dict(zip(todo, found))
            on, off = await self._model_call("score", tokens, {u: h["rows"] for u, h in hits.items()})
        except GroupUnavailable as e:
            raise HTTPException(503, f"unavailable ({e}); retry shortly") from None
        pieces = token_texts(self.tokenizer, tokens)
        return json_response({"tokens": self._scores(pieces, on, off), "chunks": await asyncio.to_thread(self._text_chunks, pieces, hits)})

    @app.get("/v1/info", response_model=api.Info, dependencies=[Depends(reader)], responses=api.errors(401))
    async def info(self) -> dict:
        """What this service serves: its DB, the model (null without one), whether changes are enabled."""
        self.refresh()
        return {"db": os.path.basename(os.path.abspath(self.db)), "chunks": len(self.view.store), "model": self.model_info,
                "admin": bool(self.tokens.admin)}

    @app.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        """The page: generate or explain, tokens shaded by what retrieval did, neighbours, remove/restore."""
        return FileResponse(os.path.join(PAGE, "index.html"))

    async def _group_stats(self) -> list[dict]:
        if self.local is not None:
            return [{**self.local.stats(), "replica": replica_name()}]
        return await asyncio.gather(*(s.stats.remote() for s in self.searchers))

    @app.get("/healthz", response_model=api.Health, responses=api.errors(503))
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
