"""A dask.distributed cluster on 127.0.0.1 for the Beam Dask runner's test and benchmark: one
scheduler and N single-threaded worker processes, each a separate ``dask`` CLI process, as on a
real cluster (started the way deploy/dask/ starts them)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

from distributed import Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_dask_cluster(workers: int = 2, *, log_dir: str, timeout_s: float = 120.0, memory_limit: str = "4GB"):
    """Yields the scheduler address once ``workers`` workers have joined; stops every process after."""
    dask = [os.path.join(os.path.dirname(sys.executable), "dask")]
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    os.makedirs(log_dir, exist_ok=True)
    procs = [
        subprocess.Popen(
            dask + ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=open(os.path.join(log_dir, "scheduler.log"), "w"),
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        for i in range(workers):
            procs.append(
                subprocess.Popen(
                    dask
                    + [
                        "worker",
                        address,
                        "--host",
                        "127.0.0.1",
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--memory-limit",
                        memory_limit,
                        "--name",
                        f"worker-{i}",
                    ],
                    stdout=open(os.path.join(log_dir, f"worker-{i}.log"), "w"),
                    stderr=subprocess.STDOUT,
                )
            )
        with Client(address, timeout=timeout_s) as client:
            client.wait_for_workers(workers, timeout=timeout_s)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
