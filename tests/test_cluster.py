"""A two-node Ray cluster on this machine (`ray start --head` + `ray start --address`) runs the
embedding and neighbour stages and writes the same bytes as the single-node run."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from conftest import BLOCK_ROWS, REPO

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _stop(temp_dir: str) -> None:
    """Stops only this cluster's processes (`ray stop` would stop every Ray on the machine)."""
    ours = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    victims = {p.pid: p for p in ours}
    for p in ours:
        try:
            victims.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in victims.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=30)


@pytest.fixture(scope="module")
def two_node_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port = "6391"
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [RAY, "start", "--head", "--port", port, "--include-dashboard=false", f"--temp-dir={temp_dir}", *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [RAY, "start", "--address", f"127.0.0.1:{port}", *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _files(db: str, kind: str) -> dict:
    root = os.path.join(db, kind)
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, fs in os.walk(root)
        for f in fs
    }


def test_embedding_and_neighbour_stages_on_two_nodes_match_one_node(db, two_node_cluster, tmp_path):
    from retro_db.manifest import read_manifest

    work = str(tmp_path / "db")
    shutil.copytree(os.path.join(os.path.dirname(db), "chunks-only"), work)
    python = [sys.executable, "-m", "pipeline"]
    # no --actors: the default layout must be placeable on N nodes of C CPUs, one actor per node here
    for stage in (["embed", "--embed-block-rows", str(BLOCK_ROWS)], ["index"], ["neighbours"]):
        t0 = time.time()
        done = subprocess.run(
            [*python, stage[0], "--db", work, *stage[1:]],
            cwd=REPO,
            env=two_node_cluster,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert time.time() - t0 < 900
    stages = read_manifest(work)["stages"]
    assert stages["embeddings"]["counts"]["ray_nodes_this_run"] == 2
    assert stages["neighbours"]["ray_nodes_this_run"] == 2
    for kind in ("embeddings", "neighbours", "tokens"):
        assert _files(work, kind) == _files(db, kind), kind
