"""Ray actor pools for the build's stages: placement across nodes and the resources left to take."""

from __future__ import annotations


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


def node_cpus() -> list[float]:
    """CPUs free now on each live node (an actor must fit on one node, not on the cluster's sum)."""
    from ray._private.state import available_resources_per_node  # Ray's DeveloperAPI: no public equivalent

    return [r.get("CPU", 0.0) for r in available_resources_per_node().values()]
