"""The index service's HTTP ingress (FastAPI on Ray Serve): the routes and the calls to the deployments.

    client -> Ingress -> QueryEmbedder (texts/tokens -> vectors), once per batch of text queries
                      -> its own ShardGroup, or ShardSearcher x G (approximate top c = k * rerank_factor
                         of each group), once per batch of searches
              merge by (distance, id) and exact re-rank (``served_db``), answers shaped by ``results``
                      -> LanguageModel (with RUN), driven by ``generation.ServedModel``: tokens up to the next
                         chunk boundary, retrieval for the completed chunk through the hops above, and so on

Each search step is the one ``retro_db.search.RetrievalIndex.search`` takes in one process, so the
service's answer equals it. HTTP plumbing and the DB's OpenAPI schema: ``http_app``; tokens: ``auth``.
"""

import asyncio
import logging
import os

import faiss
import numpy as np
from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from ray import serve

from index_service import api
from index_service.auth import Tokens, admin
from index_service.config import ServiceConfig
from index_service.deployments import Retrieval, ShardGroup, Unavailable, remote, service_health, split_rows, texts_in
from index_service.generation import ServedModel
from index_service.http_app import PAGE, app, json_response, parse_body, replica_metrics, route
from index_service.results import ResultBuilder, token_scores
from index_service.served_db import ServedDB
from model.generate import chunk_tokens
from model.retrieval import Neighbours
from retro_db import deletions, layout
from retro_db import manifest as mf
from retro_db.embedder import chunk_texts
from retro_db.search import shortlist_size
from retro_db.tokenizer import EOS, PAD, db_tokenizer, special_id, token_texts

log = logging.getLogger("index_service")

CHANGES = {"body": api.DocumentsRequest, "read": False}  # the admin token, checked before the body is read
CHANGE_ERRORS = {deletions.UnknownDocuments: 404, deletions.NotDeleted: 409}


def unavailable(e: Unavailable) -> HTTPException:
    return HTTPException(503, f"unavailable ({e}); retry shortly")


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(app)
class Ingress:
    """Validates, batches concurrent requests (one embedder call per batch of text queries, one call
    per shard group per batch of searches), merges and re-ranks, and attaches text. With no searcher
    deployments it holds the one shard group itself: an embedding query is then one hop."""

    def __init__(self, cfg: ServiceConfig, embedder, *searchers, model=None, model_info: dict | None = None):
        db = cfg.db
        manifest = mf.require_stages(db)
        self.tokens, self.max_body_bytes = Tokens.load(cfg.admin_token_file, cfg.read_token_file), cfg.max_body_bytes
        self.db, self.embedder, self.searchers = db, embedder, list(searchers)
        self.model_info = model_info
        self.local = None if self.searchers else ShardGroup(db, threads=cfg.search_threads, mmap=cfg.mmap_index)
        for method, wait in ((self.embed, cfg.embed_batch_wait_s), (self.retrieve, cfg.search_batch_wait_s)):
            method.set_max_batch_size(cfg.max_batch_queries)
            method.set_batch_wait_timeout_s(wait)
        self.tokenizer = db_tokenizer(db)
        self.results = ResultBuilder(self.tokenizer)
        self.pad_id, eos_id = special_id(self.tokenizer, PAD), special_id(self.tokenizer, EOS)
        self.model = ServedModel(model, model_info, self._retrieve_chunks, eos_id) if model is not None else None
        nlist = faiss.extract_index_ivf(faiss.read_index(layout.trained_index_path(db))).nlist
        dim = manifest["stages"]["embeddings"]["dim"]
        self.search_model = api.search_request_model(dim=dim, vocab_size=self.tokenizer.get_vocab_size(), nlist=nlist)
        self.served = ServedDB(db)
        try:  # a change killed between the audit log and the deleted list is completed now
            deletions.recover(db, self.served.view.store)
        except OSError as e:
            log.warning("%s is not writable (%s): deletions are served as they are", layout.DELETED, e)

    async def _query_vectors(self, request: api.SearchRequest) -> np.ndarray:
        """The request's queries as vectors (n, d) (the request was validated against this DB's limits)."""
        kind = next(kind for kind in api.QUERY_KINDS if getattr(request, kind) is not None)
        replica_metrics()["queries"].labels(kind).inc(len(getattr(request, kind)))
        if kind == "embeddings":
            return np.asarray(request.embeddings, dtype=np.float32)
        # token queries are embedded as the DB embedded its chunks
        return await self.embed(request.texts if kind == "texts" else chunk_texts(self.tokenizer, request.token_ids))

    # Batch sizes and waits are ServiceConfig's, set in __init__. Text-query batches wait for company
    # (embed_batch_wait_s): on a small machine requests arrive more slowly than BERT embeds them one
    # by one, and without a wait nearly every batch held one text.
    @serve.batch(max_batch_size=api.MAX_QUERIES, batch_size_fn=texts_in)
    async def embed(self, batch: list[list[str]]) -> list[np.ndarray]:
        """One embedder call for the text queries of concurrent requests: (n, d) per request."""
        return split_rows(await self.embed_now([t for texts in batch for t in texts]), [len(texts) for texts in batch])

    async def embed_now(self, texts: list[str]) -> np.ndarray:
        """texts -> (n, d) in one embedder call, without the ingress's batch wait (the embedder still
        batches concurrent calls): generation and explanation wait on their retrievals in turn."""
        return await remote("embedder", self.embedder.embed.remote(texts))

    # Several batches in flight: while one waits for remote shard groups (or searches on the search
    # thread) the next forms.
    @serve.batch(max_batch_size=api.MAX_QUERIES, max_concurrent_batches=4, batch_size_fn=Retrieval.batch_size)
    async def retrieve(self, batch: list[Retrieval]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top k (distances (n, k), ids (n, k)) per request of a batch of concurrent requests."""
        requests = [(r.vectors, r.c, r.nprobe) for r in batch]
        if self.local is not None:
            parts = [await self.local.search(requests)]
        else:
            parts = await remote("shard group", asyncio.gather(*(s.search.remote(requests) for s in self.searchers)))
        return await asyncio.to_thread(
            lambda: [self.served.top_k([p[i] for p in parts], r.vectors, r.c, r.k) for i, r in enumerate(batch)]
        )

    @route("post", "/v1/search", api.SearchResponse, 401, 413, 422, 503, body=api.SearchRequest)
    async def search(self, http_request: Request) -> Response:
        """Top-k chunks per query (by text, LM tokens or embedding), each with its text and continuation."""
        request = parse_body(self.search_model, await http_request.body())
        self.served.refresh()
        try:
            queries = await self._query_vectors(request)
            c = shortlist_size(request.k, self.served.view.rerank_factor)
            dists, ids = await self.retrieve(Retrieval(queries, request.k, c, request.nprobe))
        except Unavailable as e:
            raise unavailable(e) from None
        store = self.served.view.store  # retrieve's re-rank moved the view on if its ids needed a newer one
        if ids.size <= 100:  # decoding a few chunks costs less than a thread hop
            results = self.results.search_results(store, dists, ids, request.return_tokens)
        else:
            results = await asyncio.to_thread(self.results.search_results, store, dists, ids, request.return_tokens)
        if request.align:
            await asyncio.to_thread(self.results.align, store, results, ids, request.token_ids, request.return_tokens)
        return json_response({"results": results})

    @route("get", "/v1/chunks/{chunk_id}", api.Chunk, 401, 404, 422)
    async def chunk(self, chunk_id: int = Path(ge=0, le=api.MAX_ID)) -> dict:
        """One chunk by id, with its continuation; 404 for unknown or deleted chunks."""
        try:
            store = self.served.chunk_view(chunk_id)
        except LookupError as e:
            raise HTTPException(404, e.args[0]) from None
        return self.results.chunks(store, np.array([chunk_id]), with_tokens=True)[0]

    async def _change(self, action: str, request: api.DocumentsRequest, actor: str) -> dict:
        try:
            return await asyncio.to_thread(
                self.served.change, action, request.doc_ids, reason=request.reason, actor=actor
            )
        # unknown documents, restoring what is not deleted, what the schema cannot say (a blank reason)
        except ValueError as e:
            raise HTTPException(CHANGE_ERRORS.get(type(e), 422), str(e)) from None
        except OSError as e:  # a read-only DB/deleted: the deployment's volume layout, not the client's fault
            log.error("cannot record a %s in %s: %s", action, layout.DELETED, e)
            raise HTTPException(
                403, f"this deployment cannot change its deletions ({layout.DELETED}/ is not writable here)"
            ) from None

    # Bodies parsed after the token is checked: a caller without it learns nothing from a 422.
    @route("post", "/v1/documents/delete", api.ChangeResponse, 401, 403, 404, 413, 422, **CHANGES)
    async def delete(self, http_request: Request, actor: str = Depends(admin)) -> dict:
        """Removes documents from every search and from training (persisted and audited; every replica
        sees it on its next request). Needs the admin token."""
        return await self._change(deletions.DELETE, parse_body(api.DocumentsRequest, await http_request.body()), actor)

    @route("post", "/v1/documents/restore", api.ChangeResponse, 401, 403, 404, 409, 413, 422, **CHANGES)
    async def restore(self, http_request: Request, actor: str = Depends(admin)) -> dict:
        """Undoes a deletion: the documents are searched (and trained on) again. Audited; needs the admin token."""
        return await self._change(deletions.RESTORE, parse_body(api.DocumentsRequest, await http_request.body()), actor)

    @route("get", "/v1/deletions", api.DeletionsResponse, 401, 422)
    async def deletion_log(
        self,
        since: int = Query(0, ge=0, le=api.MAX_ID, description="entries after this seq"),
        limit: int = Query(100, ge=1, le=1000, description="at most this many entries"),
    ) -> dict:
        """The audit log of deletions and restorations, oldest first, and what is deleted now."""
        entries = await asyncio.to_thread(deletions.audit_log, self.db, since=since, limit=limit)
        docs, chunks = deletions.deleted(self.db)
        return {"entries": entries, "total_documents_deleted": len(docs), "total_chunks_deleted": len(chunks)}

    # --- the served model (RUN): generation and explanation, retrieving through the batches above ---

    def _served_model(self) -> ServedModel:
        if self.model is None:
            raise HTTPException(
                404,
                "this service serves no model: start it with a checkpoint (make serve RUN=runs/default, "
                "or --run <checkpoint or run directory>)",
            )
        return self.model

    async def _retrieve_chunks(self, tokens: list[int], todo: list[int], k: int) -> dict[int, Neighbours]:
        """The k nearest DB chunks of chunks ``todo`` of ``tokens``, as a token query of /v1/search would find
        them (lined up with their chunk when the model has align_neighbours)."""
        if not todo:
            return {}
        chunks = [chunk_tokens(tokens, u, self.model_info["chunk_size"]) for u in todo]
        self.served.refresh()
        vectors = await self.embed_now(chunk_texts(self.tokenizer, chunks))
        dists, ids = await self.retrieve(Retrieval(vectors, k, shortlist_size(k, self.served.view.rerank_factor), None))
        align = self.model_info.get("align_neighbours", False)
        return dict(zip(todo, self.served.neighbours(dists, ids, chunks, self.pad_id, align=align)))

    async def _text_chunks(self, pieces: list[str], hits: dict[int, Neighbours]) -> list[dict]:
        """The text's chunks (``pieces``: each token's text), each with the neighbours that conditioned it."""
        view, m = self.served.view_for(hits), self.model_info["chunk_size"]
        return await asyncio.to_thread(self.results.text_chunks, view.store, view.documents, pieces, hits, m)

    @route("post", "/v1/generate", api.GenerateResponse, 401, 404, 413, 422, 503, body=api.GenerateRequest)
    async def generate(self, http_request: Request) -> Response:
        """Continues the prompt, retrieving at every chunk boundary; each chunk comes with the neighbours
        that conditioned it. The same request (seed included) gives the same text."""
        request = parse_body(api.GenerateRequest, await http_request.body())
        model = self._served_model()
        # never empty: byte-level BPE gives a token per byte at worst
        prompt = self.tokenizer.encode(request.prompt).ids
        try:
            tokens, hits, scores = await model.generate(prompt, request)
        except Unavailable as e:
            raise unavailable(e) from None
        pieces, generated = token_texts(self.tokenizer, tokens), tokens[len(prompt) :]
        body = {
            "text": self.tokenizer.decode(generated),
            "prompt_tokens": len(prompt),
            "generated_tokens": len(generated),
        }
        body["chunks"] = await self._text_chunks(pieces, hits)
        if scores is not None:
            body["tokens"] = token_scores(pieces, *scores)
        return json_response(body)

    @route("post", "/v1/explain", api.ExplainResponse, 401, 404, 413, 422, 503, body=api.ExplainRequest)
    async def explain(self, http_request: Request) -> Response:
        """Every token's log-probability with and without retrieval, and each chunk's neighbours (the
        paper's Tables 16-19): where retrieval raised or lowered the model's belief, and from what text."""
        request = parse_body(api.ExplainRequest, await http_request.body())
        model = self._served_model()
        tokens = self.tokenizer.encode(request.text).ids
        try:
            hits, (on, off) = await model.explain(tokens, request.k)
        except Unavailable as e:
            raise unavailable(e) from None
        pieces = token_texts(self.tokenizer, tokens)
        return json_response({"tokens": token_scores(pieces, on, off), "chunks": await self._text_chunks(pieces, hits)})

    @route("get", "/v1/info", api.Info, 401)
    async def info(self) -> dict:
        """What this service serves: its DB, the model (null without one), whether changes are enabled."""
        self.served.refresh()
        return {
            "db": os.path.basename(os.path.abspath(self.db)),
            "chunks": len(self.served.view.store),
            "model": self.model_info,
            "admin": bool(self.tokens.admin),
        }

    @app.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        """The page: generate or explain, tokens shaded by what retrieval did, neighbours, remove/restore."""
        return FileResponse(os.path.join(PAGE, "index.html"))

    @app.get("/healthz", response_model=api.Health, responses=api.errors(503))
    async def healthz(self) -> dict:
        increments = len(mf.read_manifest(self.db).get("increments", []))
        try:
            return await asyncio.wait_for(service_health(self.local, self.searchers, increments=increments), timeout=10)
        except Exception as e:
            raise HTTPException(503, f"shard groups are not answering ({type(e).__name__})") from None

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> str:
        """Prometheus text format: requests by endpoint and status, latency histogram, queries by kind."""
        return generate_latest(replica_metrics()["registry"]).decode()
