"""Connecting to Ray: a cluster at ``RAY_ADDRESS`` when given, else a local one on 127.0.0.1."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect_ray(address: str | None = None):
    """Initialises Ray once per process; returns the ray module."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers inherit these: they keep tokenizers from forking thread pools in every actor.
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # address="local": a new single-node Ray, never one that `ray start` left running here
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, runtime_env={"env_vars": env},
                 logging_level=logging.WARNING, log_to_driver=False)
    return ray


class ReportsNode:
    """Mixed into stage actors: the node an actor landed on (the manifest records how many were used)."""

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def spread_actor_pool(actor_class, n: int, resources: dict, *args):
    """(ActorPool of ``n`` actors placed one per node before two on one, number of nodes they landed on)."""
    import ray

    remote_class = ray.remote(scheduling_strategy="SPREAD", **resources)(actor_class)
    actors = [remote_class.remote(*args) for _ in range(n)]
    return ray.util.ActorPool(actors), len(set(ray.get([a.node.remote() for a in actors])))


def cluster_cpus_gpus() -> tuple[float, float]:
    """CPUs and GPUs free now: a node that also runs the index service lends only what is left."""
    import ray

    resources = ray.available_resources()
    return resources.get("CPU", 0.0), resources.get("GPU", 0.0)
