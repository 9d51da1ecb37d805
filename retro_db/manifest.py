"""``DB/manifest.json``: one record per stage (config, fingerprints, versions, counts, per-shard status).

Readers use it to find what a DB holds (its increments, the index's measured nprobe) and to
refuse a DB that is not built far enough, with the command that builds it. The build side's stage
protocol (``pipeline.stage``) writes it; every write replaces the file atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from importlib import metadata

from retro_db import layout, storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STAGES = ("chunks", "embeddings", "index", "neighbours")
BUILD_HINT = "make build-db DB={db}"


class DBNotReady(FileNotFoundError):
    """The DB (or one of its stages) is missing: the message names what and the command that builds it."""


def _read(db: str) -> dict | None:
    """The manifest, or None when the DB has none."""
    path = layout.manifest_path(db)
    if not storage.storage_for(path).exists(path):
        return None
    try:
        manifest = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or rebuild with --overwrite") from e
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {manifest.get('format')!r}, this code reads {FORMAT_VERSION}; "
            "rebuild the DB with this version (make build-db)"
        )
    return manifest


def read_manifest(db: str) -> dict:
    """The manifest; an empty one (no stages) when the DB has none yet."""
    return _read(db) or {"format": FORMAT_VERSION, "stages": {}}


def write_manifest(db: str, manifest: dict) -> None:
    # atomic: a running index service never sees a half-written or missing manifest
    storage.write_atomically(
        layout.manifest_path(db), (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")
    )


def require_stages(db: str, stages=("chunks", "embeddings", "index"), *, hint: str = BUILD_HINT) -> dict:
    """The manifest of a DB whose ``stages`` are complete; else ``DBNotReady`` saying what to run."""
    manifest = _read(db)
    if manifest is None:
        raise DBNotReady(f"{db}: no {layout.MANIFEST}, so no DB is there; build it first ({hint.format(db=db)})")
    missing = [s for s in stages if manifest["stages"].get(s, {}).get("status") != "complete"]
    if missing:
        raise DBNotReady(f"{db}: stage(s) {', '.join(missing)} not complete; finish them with {hint.format(db=db)}")
    return manifest


def stat_signature(path: str) -> tuple:
    """Changes whenever a file is replaced or rewritten (readers poll it); () when it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return st.st_ino, st.st_mtime_ns, st.st_size


def db_roots(db: str, manifest: dict | None = None) -> list[str]:
    """The DB, then every increment added to it (``DB/increments/<name>``, same layout, ids after the DB's)."""
    manifest = manifest if manifest is not None else read_manifest(db)
    return [db] + [storage.join(db, inc["path"]) for inc in manifest.get("increments", [])]


@contextlib.contextmanager
def locked(db: str):
    """Serialises read-modify-write of a local DB's manifest across processes (a no-op for URIs,
    where one job owns the DB)."""
    if storage.is_remote(db):
        yield
        return
    os.makedirs(db, exist_ok=True)  # the first stage's first record creates the DB
    with open(os.path.join(db, layout.MANIFEST_LOCK), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_stage(db: str, stage: str, **fields) -> dict:
    """Merges ``fields`` into one stage's record and writes the manifest."""
    with locked(db):
        manifest = read_manifest(db)
        record = manifest["stages"].setdefault(stage, {})
        record.update(fields)
        record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_manifest(db, manifest)
    return record


def package_versions(*names: str) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
