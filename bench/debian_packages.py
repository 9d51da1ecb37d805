"""Debian packages pinned by sha256, as the benchmarks' corpora use them."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def pinned_package_root(folder: Path, spec: str, sha256: str) -> Path:
    """The unpacked root of ``apt-get download <spec>`` in ``folder``: downloaded once, its sha256 checked every
    time, unpacked once (into a temporary folder renamed into place, so an interrupted unpack is not reused)."""
    debs = sorted(folder.glob("*.deb"))
    if not debs:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", spec], cwd=folder, check=True)
        debs = sorted(folder.glob("*.deb"))
    digest = hashlib.sha256(debs[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{debs[0]}: sha256 {digest}, expected {sha256} (the pinned {spec})")
    root = folder / "root"
    if not root.exists():
        subprocess.run(["dpkg", "-x", str(debs[0]), str(root) + ".tmp"], check=True)
        Path(str(root) + ".tmp").rename(root)
    return root
