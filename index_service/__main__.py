"""``python -m index_service --db db --port 8000``: serve a built DB on Ray Serve (``make serve``).

Binds 127.0.0.1 unless ``--host`` says otherwise; joins the Ray cluster at ``RAY_ADDRESS`` when set.
Runs until interrupted. ``deploy/serve.yaml`` describes the same application for ``serve deploy``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    from index_service.app import ServiceConfig

    d = ServiceConfig()
    parser = argparse.ArgumentParser(prog="python -m index_service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--shard-groups", type=int, default=d.shard_groups, help="shard deployments (index shards dealt round-robin)")
    parser.add_argument("--shard-replicas", type=int, default=d.shard_replicas, help="replicas per shard deployment")
    parser.add_argument("--embed-replicas", type=int, default=d.embed_replicas)
    parser.add_argument("--search-threads", type=int, default=d.search_threads, help="faiss threads per searcher replica")
    parser.add_argument("--embed-threads", type=int, default=d.embed_threads, help="torch threads per embedder replica")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("index_service")

    from ray import serve

    from index_service.app import build_app
    from pipeline.ray_cluster import connect_ray

    try:
        application = build_app({"db": args.db, "shard_groups": args.shard_groups, "shard_replicas": args.shard_replicas,
                                 "embed_replicas": args.embed_replicas, "search_threads": args.search_threads,
                                 "embed_threads": args.embed_threads})
    except ValueError as e:
        log.error("%s", e)
        return 2
    connect_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="retro-index", route_prefix="/")
    log.info("serving %s at http://%s:%d (OpenAPI at /docs); Ctrl-C stops", args.db, args.host, args.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
