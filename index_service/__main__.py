"""``python -m index_service --db db --port 8000 [--run runs/default]``: serve a built DB on Ray Serve
(``make serve``), and with ``--run`` a trained checkpoint and the page at ``/`` (``make serve RUN=...``).

Binds 127.0.0.1 unless ``--host`` says otherwise; joins the Ray cluster at ``RAY_ADDRESS`` when set,
else starts one whose HTTP ingress is HAProxy (``--no-haproxy``: Serve's Python proxy).
Runs until interrupted. ``deploy/serve.yaml`` describes the same application for ``serve deploy``;
every ``ServiceConfig`` setting is a flag here.
"""

import argparse
import logging
import os
import time

from ray import serve

from index_service.app import ServiceConfig, build_app, haproxy_env
from retro_db import cli
from retro_db.ray_cluster import connect_ray


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m index_service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--haproxy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Ray Serve's HAProxy ingress (index_service.app.HAPROXY_ENV) rather than its Python proxy, which is "
        "slower (docs/BENCHMARKS.md, Stage 5). For the Ray this starts; a cluster at RAY_ADDRESS uses what its "
        "`ray start` environment set",
    )
    cli.add_config_flags(parser, ServiceConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = cli.config_from_args(ServiceConfig, args)
    application = build_app(cfg)
    if args.haproxy and not os.environ.get("RAY_ADDRESS"):
        os.environ.update(haproxy_env())  # read by the Ray processes connect_ray starts
    connect_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="retro-index", route_prefix="/")
    what = f"{cfg.db} and the model {cfg.run}" if cfg.run else cfg.db
    print(f"serving {what}: open http://{args.host}:{args.port}/ (API: /docs); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    cli.run(main, "index_service")
