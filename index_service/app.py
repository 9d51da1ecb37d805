"""The retrieval DB as a Ray Serve application: the typed config and the app builder.

    client -> Ingress (FastAPI, ``index_service.ingress``)
                -> QueryEmbedder, ShardSearcher x G (``index_service.deployments``)

    serve run index_service.app:build_app db=db          # or: make serve, or deploy/serve.yaml

Serve validates the arguments of ``serve run`` / a config file's ``args`` into ``ServiceConfig``
(typed application builder), so an unknown or mistyped setting fails before anything starts.
"""

import logging
import os

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from index_service.deployments import QueryEmbedder, ShardSearcher
from index_service.ingress import Ingress
from retro_db.manifest import require_stages

log = logging.getLogger("index_service")


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    db: str = Field("db", description="the DB directory")
    shard_groups: int = Field(2, ge=1, description="ShardSearcher deployments; index shards are dealt to them round-robin")
    shard_replicas: int = Field(1, ge=1, description="replicas of each shard group")
    embed_replicas: int = Field(1, ge=1, description="replicas of the query embedder")
    search_threads: int = Field(1, ge=1, description="faiss OpenMP threads per searcher replica")
    mmap_index: bool = Field(False, description="memory-map index shards: less RAM, but IVF-PQ search was 4x slower here")
    embed_threads: int = Field(1, ge=1, description="torch intra-op threads per embedder replica")
    search_cpus: float = Field(0.25, gt=0, description="Ray CPUs reserved per searcher replica; fractional so small machines fit")
    embed_cpus: float = Field(0.5, gt=0, description="Ray CPUs reserved per embedder replica")
    ingress_cpus: float = Field(0.25, gt=0, description="Ray CPUs reserved per ingress replica")
    max_batch_size: int = Field(32, ge=1, description="requests per @serve.batch call (searchers and embedder)")
    batch_wait_s: float = Field(0.002, ge=0, description="longest wait for a batch to fill")
    health_check_period_s: float = Field(2.0, gt=0, description="seconds between replica health checks")


def build_app(cfg: ServiceConfig) -> Application:
    """The Serve application; ``DBNotReady`` names what is missing when the DB cannot be served."""
    db = os.path.abspath(cfg.db)
    require_stages(db)
    health = {"health_check_period_s": cfg.health_check_period_s, "health_check_timeout_s": 10 * cfg.health_check_period_s}
    batch = {"max_batch_size": cfg.max_batch_size, "batch_wait_s": cfg.batch_wait_s}
    searchers = [
        ShardSearcher.options(name=f"ShardSearcher-{g}", num_replicas=cfg.shard_replicas, ray_actor_options={"num_cpus": cfg.search_cpus}, **health)
        .bind(db, g, cfg.shard_groups, threads=cfg.search_threads, mmap=cfg.mmap_index, **batch)
        for g in range(cfg.shard_groups)
    ]
    embedder = (QueryEmbedder.options(num_replicas=cfg.embed_replicas, ray_actor_options={"num_cpus": cfg.embed_cpus}, **health)
                .bind(db, threads=cfg.embed_threads, **batch))
    log.info("index service: %s", cfg.model_dump())
    return Ingress.options(ray_actor_options={"num_cpus": cfg.ingress_cpus}, **health).bind(db, embedder, *searchers)
