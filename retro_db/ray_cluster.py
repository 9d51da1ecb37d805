"""Connecting to Ray: a cluster at ``RAY_ADDRESS`` when given, else a local one on 127.0.0.1.

Shared by the build's Ray stages and the index service; Ray is imported only when connecting, so
readers of a DB that never start Ray do not need it installed.
"""

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
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            runtime_env={"env_vars": env},
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    return ray
