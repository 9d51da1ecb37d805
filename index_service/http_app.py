"""The ingress's HTTP plumbing: the FastAPI app, its middleware (body limit, request metrics), the
JSON fast path (bodies parsed by pydantic, answers encoded by orjson) and the DB's OpenAPI schema.

The routes are ``index_service.ingress.Ingress``'s methods; what they need per replica (the body
limit, tokens, the DB's search schema) is read from the replica's ``Ingress`` (``replica_object``).
"""

from __future__ import annotations

import copy
import os
import time

import orjson
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ValidationError

from index_service import api
from index_service.auth import reader
from index_service.deployments import replica_object

app = FastAPI(
    title="RETRO index service",
    version="1",
    description="Nearest chunks of the RETRO retrieval database, with their text and continuation.",
)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page")
app.mount("/static", StaticFiles(directory=PAGE), name="static")
METRICS = None


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError):
    """422 with where and what, without echoing the input (it may be huge, or hold NaN, which JSON cannot carry)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": detail})


def replica_metrics() -> dict:
    """Prometheus metrics of this ingress replica (created in the replica's process)."""
    global METRICS
    if METRICS is None:
        registry = CollectorRegistry()
        METRICS = {
            "registry": registry,
            "requests": Counter("retro_index_requests", "HTTP requests", ["endpoint", "status"], registry=registry),
            "seconds": Histogram(
                "retro_index_request_seconds",
                "request latency",
                ["endpoint"],
                registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            ),
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
            registry = replica_metrics()
            registry["requests"].labels(endpoint, str(status[0])).inc()
            registry["seconds"].labels(endpoint).observe(time.perf_counter() - t0)


class BodyLimit:
    """413 for a request body over the service's ``max_body_bytes``: by its Content-Length before anything
    is read, else while it streams in (the handler's read raises)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = replica_object().max_body_bytes
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


MODEL_ROUTES = ("/v1/generate", "/v1/explain")
READ_ROUTES: list[tuple[str, str]] = []  # (method, path) of the routes ``route`` made with ``read``


def db_openapi() -> dict:
    """FastAPI's schema with this DB's search limits in it, auth declared where it is required (read
    routes need no token when reads are open), and the model's routes only with a model. A module
    function, so that the replica runs it on its own imported ``app``."""
    if app.openapi_schema is None:
        schema = copy.deepcopy(FastAPI.openapi(app))
        content = schema["paths"]["/v1/search"]["post"]["requestBody"]["content"]["application/json"]
        ingress = replica_object()
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


def route(
    method: str,
    path: str,
    response: type[BaseModel],
    *errors: int,
    body: type[BaseModel] | None = None,
    read: bool = True,
):
    """``app.<method>(path, ...)`` with the route's answer, errors, JSON body (parsed by ``parse_body``)
    and, with ``read``, the read token where reads need one."""
    if read:
        READ_ROUTES.append((method, path))
    extra = {"openapi_extra": json_body(body)} if body else {}
    depends = {"dependencies": [Depends(reader)]} if read else {}
    return getattr(app, method)(path, response_model=response, responses=api.errors(*errors), **extra, **depends)


def parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    """The body validated by pydantic's own JSON parser (FastAPI's json.loads and then validation is
    slower, docs/BENCHMARKS.md, Stage 5). Errors keep FastAPI's 422 form."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(
            [
                {
                    **err,
                    "loc": ("body", *err["loc"]),
                    "msg": f"JSON decode error: {err['msg']}" if err["type"] == "json_invalid" else err["msg"],
                }
                for err in e.errors()
            ]
        ) from None


def json_body(model: type[BaseModel]) -> dict:
    """OpenAPI for a route that parses its body with ``parse_body``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def json_response(content: dict) -> Response:
    """The handlers build plain JSON types already: FastAPI's encoder and response re-validation were
    the ingress's largest per-request cost, so orjson encodes them. ``response_model`` still
    documents the schema."""
    return Response(orjson.dumps(content), media_type="application/json")
