"""The retrieval DB as a Ray Serve application: shard searchers, a query embedder, an HTTP ingress.

    client -> Ingress (FastAPI) -> QueryEmbedder (texts/tokens -> vectors, @serve.batch)
                                -> ShardSearcher x G (each holds every G-th index shard, @serve.batch)
                                <- approximate top c = k * rerank_factor of each group
              merge by (distance, id), exact re-rank on the memory-mapped vectors, text from the token store

Each step is the one ``RetrievalIndex.search`` takes in one process (``search_shards``,
``merge_top_k``, ``rerank``), so the service's answer equals it. Searchers and ingress check the DB's state (two ``stat`` calls) before each batch: a
document deletion or an added increment reaches every replica on its next request, without a
restart, and a replica that Serve restarts reads the same state from disk.

    serve run index_service.app:build_app db=db          # or: make serve, or deploy/serve.yaml
"""


import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve

from index_service import api
from pipeline import deletions
from pipeline import manifest as mf
from pipeline.faiss_index import IndexShard, deleted_selector, index_shard_paths, load_indexed_vectors, merge_top_k, rerank, search_shards
from pipeline.lm_tokenizer import PAD, load_lm_tokenizer, special_id
from pipeline.token_store import TokenStore

log = logging.getLogger("index_service")


@dataclass
class ServiceConfig:
    db: str = "db"
    shard_groups: int = 2  # ShardSearcher deployments; index shards are dealt to them round-robin
    shard_replicas: int = 1  # replicas of each group
    embed_replicas: int = 1
    search_threads: int = 1  # faiss OpenMP threads per searcher replica
    mmap_index: bool = False  # memory-map index shards: less RAM, but IVF-PQ search was 4x slower here
    embed_threads: int = 1  # torch intra-op threads per embedder replica
    search_cpus: float = 0.25  # Ray CPUs reserved per replica; fractional so small machines fit
    embed_cpus: float = 0.5
    ingress_cpus: float = 0.25
    max_batch_size: int = 32  # requests per @serve.batch call (searchers and embedder)
    batch_wait_s: float = 0.002
    health_check_period_s: float = 2.0


def check_db(db: str) -> dict:
    """The DB's manifest, if the DB can be served; else a ValueError saying what is missing."""

    if not os.path.exists(os.path.join(db, "manifest.json")):
        raise ValueError(f"{db}: no manifest.json; build the DB first (make build-db DB={db})")
    manifest = mf.read_manifest(db)
    missing = [s for s in ("chunks", "embeddings", "index") if manifest["stages"].get(s, {}).get("status") != "complete"]
    if missing:
        raise ValueError(f"{db}: stages {', '.join(missing)} are not complete; finish them with make build-db DB={db}")
    return manifest


@serve.deployment(max_ongoing_requests=64)
class ShardSearcher:
    """Holds every ``groups``-th index shard, searches them, returns their merged approximate top c.

    The IVF-PQ codes are in RAM unless ``mmap`` (faiss's memory-mapped inverted lists searched 4x
    slower on this machine).
    """

    def __init__(self, db: str, group: int, groups: int, *, threads: int = 1, mmap: bool = False, max_batch_size: int = 32,
                 batch_wait_s: float = 0.002):
        import faiss

        faiss.omp_set_num_threads(threads)  # what this replica reserved; faiss would take every core
        self.search.set_max_batch_size(max_batch_size)
        self.search.set_batch_wait_timeout_s(batch_wait_s)
        self.db, self.group, self.groups, self.mmap = db, group, groups, mmap
        self.shards: dict = {}
        self.selector, self.n_deleted = None, 0
        self._manifest_sig = self._deleted_sig = None
        self.nprobe = 8
        self.refresh()

    def refresh(self) -> None:
        sig = mf.stat_signature(os.path.join(self.db, mf.MANIFEST))
        if sig != self._manifest_sig:
            index = mf.read_manifest(self.db)["stages"].get("index", {})
            if index.get("status") == "complete":  # mid-rebuild: keep serving what is loaded
                mine = index_shard_paths(self.db)[self.group :: self.groups]
                for path in set(self.shards) - set(mine):
                    del self.shards[path]
                for path in mine:
                    if path not in self.shards:
                        self.shards[path] = IndexShard(path, mmap=self.mmap)
                        log.info("shard group %d: loaded %s (%d vectors)", self.group, path, self.shards[path].ntotal)
                self.nprobe = index.get("default_nprobe") or self.nprobe
            self._manifest_sig = sig
        dsig = deletions.deletions_signature(self.db)
        if dsig != self._deleted_sig:
            deleted = deletions.deleted_chunk_ids(self.db)
            self.selector, self.n_deleted, self._deleted_sig = deleted_selector(deleted), len(deleted), dsig

    def search_many(self, requests: list[tuple[np.ndarray, int, int | None]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Searches a batch of requests, one faiss call per distinct (k, nprobe)."""
        self.refresh()
        out = [None] * len(requests)
        for key in {(k, nprobe) for _, k, nprobe in requests}:
            idx = [i for i, (_, k, nprobe) in enumerate(requests) if (k, nprobe) == key]
            k, nprobe = key
            queries = np.ascontiguousarray(np.concatenate([requests[i][0] for i in idx]), dtype=np.float32)
            if self.shards:
                dists, ids = search_shards(list(self.shards.values()), queries, k, nprobe=nprobe or self.nprobe, selector=self.selector)
            else:  # more groups than shards: this one holds none
                dists, ids = np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
            start = 0
            for i in idx:
                n = len(requests[i][0])
                out[i] = (dists[start : start + n], ids[start : start + n])
                start += n
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.004)
    async def search(self, requests: list[tuple[np.ndarray, int, int | None]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(queries (n, d), c, nprobe) -> approximate (distances (n, c), ids (n, c)); faiss runs off the event loop."""
        return await asyncio.to_thread(self.search_many, requests)

    def stats(self) -> dict:
        self.refresh()
        return {"group": self.group, "replica": serve.get_replica_context().replica_id.to_full_id_str(),
                "index_shards": len(self.shards), "vectors": sum(s.ntotal for s in self.shards.values()), "deleted_chunks": self.n_deleted}

    def check_health(self) -> None:
        if not mf.stat_signature(os.path.join(self.db, mf.MANIFEST)):
            raise RuntimeError(f"{self.db}/{mf.MANIFEST} has gone away")


@serve.deployment(max_ongoing_requests=64)
class QueryEmbedder:
    """The DB's frozen BERT: a list of texts per request, requests batched across callers."""

    def __init__(self, db: str, *, threads: int = 1, max_batch_size: int = 32, batch_wait_s: float = 0.004):
        from pipeline.embed import ChunkEmbedder

        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_s)

        model = check_db(db)["stages"]["embeddings"]["config"]["model"]
        self.embedder = ChunkEmbedder(model, threads=threads)

    def embed_many(self, requests: list[list[str]]) -> list[np.ndarray]:
        vectors = self.embedder.embed_texts([t for texts in requests for t in texts])
        splits = np.cumsum([len(texts) for texts in requests])[:-1]
        return np.split(vectors, splits)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.004)
    async def embed(self, requests: list[list[str]]) -> list[np.ndarray]:
        """texts -> (n, d) float32 per request."""
        return await asyncio.to_thread(self.embed_many, requests)


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
        from prometheus_client import CollectorRegistry, Counter, Histogram

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
        import faiss

        manifest = check_db(db)
        self.db, self.embedder, self.searchers = db, embedder, list(searchers)
        self.tokenizer = load_lm_tokenizer(os.path.join(db, "tokenizer.json"))
        self.pad_id, self.vocab_size = special_id(self.tokenizer, PAD), self.tokenizer.get_vocab_size()
        self.dim = manifest["stages"]["embeddings"]["dim"]
        trained = faiss.read_index(os.path.join(db, "index", "trained.faissindex"))
        self.nlist = faiss.extract_index_ivf(trained).nlist
        self._manifest_sig = self._deleted_sig = None
        self.refresh()

    def refresh(self) -> None:
        sig = mf.stat_signature(os.path.join(self.db, mf.MANIFEST))
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
        from prometheus_client import generate_latest

        return generate_latest(_metrics()["registry"]).decode()


def build_app(args: dict):
    """The Serve application (``serve run index_service.app:build_app db=...`` passes strings)."""
    fields = ServiceConfig.__dataclass_fields__
    unknown = set(args) - set(fields)
    if unknown:
        raise ValueError(f"unknown index service settings {sorted(unknown)}; known: {sorted(fields)}")
    def cast(name, value):
        kind = fields[name].type
        return value.lower() in ("1", "true", "yes") if kind is bool and isinstance(value, str) else kind(value)

    cfg = ServiceConfig(**{k: cast(k, v) for k, v in args.items()})
    cfg.db = os.path.abspath(cfg.db)
    check_db(cfg.db)
    health = {"health_check_period_s": cfg.health_check_period_s, "health_check_timeout_s": 10 * cfg.health_check_period_s}
    batch = {"max_batch_size": cfg.max_batch_size, "batch_wait_s": cfg.batch_wait_s}
    searchers = [
        ShardSearcher.options(name=f"ShardSearcher-{g}", num_replicas=cfg.shard_replicas, ray_actor_options={"num_cpus": cfg.search_cpus}, **health)
        .bind(cfg.db, g, cfg.shard_groups, threads=cfg.search_threads, mmap=cfg.mmap_index, **batch)
        for g in range(cfg.shard_groups)
    ]
    embedder = QueryEmbedder.options(num_replicas=cfg.embed_replicas, ray_actor_options={"num_cpus": cfg.embed_cpus}, **health).bind(cfg.db, threads=cfg.embed_threads, **batch)
    log.info("index service: %s", asdict(cfg))
    return Ingress.options(ray_actor_options={"num_cpus": cfg.ingress_cpus}, **health).bind(cfg.db, embedder, *searchers)
