"""``ServiceConfig``: every setting of the index service, typed (Serve validates ``serve run`` and
config-file ``args`` into it; ``python -m index_service`` derives its flags from it)."""

from pydantic import BaseModel, ConfigDict, Field

from index_service import api


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    db: str = Field("db", description="the DB directory")
    shard_groups: int = Field(
        1,
        ge=1,
        description="1: the ingress holds every index shard (no hop); G > 1: G ShardSearcher "
        "deployments, index shards dealt to them round-robin (for an index larger than one node)",
    )
    shard_replicas: int = Field(1, ge=1, description="replicas of each shard group (G > 1)")
    ingress_replicas: int = Field(
        2,
        ge=1,
        description="replicas of the ingress; with 1 shard group each holds the index in RAM. 2: their Python "
        "work (parsing, re-ranking, answers) runs on two cores (docs/BENCHMARKS.md, Stage 5)",
    )
    embed_replicas: int = Field(1, ge=1, description="replicas of the query embedder")
    search_threads: int = Field(
        1,
        ge=1,
        description="faiss OpenMP threads of the one search thread of each replica that searches "
        "(the ingress with 1 shard group, else each ShardSearcher)",
    )
    mmap_index: bool = Field(
        False, description="memory-map index shards: less RAM, slower IVF-PQ search (docs/BENCHMARKS.md)"
    )
    embed_threads: int = Field(
        0, ge=0, description="torch intra-op threads per embedder replica (0: embed_cpus rounded up)"
    )
    search_cpus: float = Field(
        0.25, gt=0, description="Ray CPUs reserved per searcher replica; fractional so small machines fit"
    )
    embed_cpus: float = Field(1.5, gt=0, description="Ray CPUs reserved per embedder replica")
    ingress_cpus: float = Field(
        0.125,
        gt=0,
        description="Ray CPUs reserved per ingress replica (with the embedder's and a model's, "
        "the defaults fit 2 CPUs)",
    )
    max_batch_queries: int = Field(
        api.MAX_QUERIES, ge=api.MAX_QUERIES, description="queries per batch of concurrent requests (ingress, embedder)"
    )
    embed_batch_wait_s: float = Field(
        0.02, ge=0, description="longest wait of the ingress for a batch of text queries to fill"
    )
    search_batch_wait_s: float = Field(
        0.001, ge=0, description="longest wait of the ingress for a batch of searches to fill"
    )
    health_check_period_s: float = Field(2.0, gt=0, description="seconds between replica health checks")
    admin_token_file: str = Field(
        "",
        description="file of admin bearer tokens (<token> or <name>:<token> per line), e.g. a mounted Secret; "
        "also read: $RETRO_ADMIN_TOKEN. Without one, deleting and restoring answer 403",
    )
    read_token_file: str = Field(
        "", description="file of read tokens (also $RETRO_READ_TOKEN); without one, reads are open"
    )
    run: str = Field(
        "",
        description="a checkpoint, or a run directory of make train (RUN/retro/ckpt.pt): serves the model "
        "(/v1/generate, /v1/explain, the page at /); empty: the index alone",
    )
    model_replicas: int = Field(1, ge=1, description="replicas of the language model")
    model_cpus: float = Field(0.25, gt=0, description="Ray CPUs reserved per model replica")
    model_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (the model runs on CUDA when it has one)")
    model_threads: int = Field(
        2,
        ge=0,
        description="torch threads per model replica (0: model_cpus rounded up); 2: generation alternates "
        "with query embedding, so two threads rarely compete (docs/BENCHMARKS.md, generation)",
    )
    max_body_bytes: int = Field(
        32 << 20,
        ge=1 << 20,
        description="request bodies over this many bytes get 413 (the API's largest "
        "request, 256 texts of 16384 characters, fits)",
    )
