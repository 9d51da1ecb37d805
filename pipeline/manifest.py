"""``DB/manifest.json``: one record per stage (config, versions, counts, per-shard status).

A stage's record is what makes reruns safe: the same config resumes or skips, a different one
is refused (naming the fields that differ) unless the caller asks to overwrite, so outputs of two
configs are never mixed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from importlib import metadata

from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STAGES = ("chunks", "embeddings", "index", "neighbours")


class ConfigMismatch(RuntimeError):
    pass


def join(db: str, *parts: str) -> str:
    return FileSystems.join(db.rstrip("/"), *parts)


def read_manifest(db: str) -> dict:
    path = join(db, MANIFEST)
    if not FileSystems.exists(path):
        return {"format": FORMAT_VERSION, "stages": {}}
    with FileSystems.open(path) as f:
        try:
            manifest = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); restore it or rebuild with --overwrite") from e
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, this code reads {FORMAT_VERSION}")
    return manifest


def stat_signature(path: str) -> tuple:
    """Changes whenever a file is replaced or rewritten (readers poll it); () when it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return st.st_ino, st.st_mtime_ns, st.st_size


def db_roots(db: str) -> list[str]:
    """The DB, then every increment added to it (``DB/increments/<name>``, same layout, ids after the DB's)."""
    return [db] + [join(db, inc["path"]) for inc in read_manifest(db).get("increments", [])]


def write_manifest(db: str, manifest: dict) -> None:
    """Writes the manifest atomically (temp file + rename) so a crash never leaves half a file."""
    path, tmp = join(db, MANIFEST), join(db, MANIFEST + ".tmp")
    with FileSystems.create(tmp) as f:
        f.write((json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    FileSystems.rename([tmp], [path])  # replaces: a running index service never sees no manifest


@contextlib.contextmanager
def locked(db: str):
    """Serialises read-modify-write of a local DB's manifest across processes (a no-op for URIs,
    where one job owns the DB)."""
    if "://" in db:
        yield
        return
    with open(os.path.join(db, ".manifest.lock"), "w") as lock:
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


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def package_versions(*names: str) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with FileSystems.open(path) as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def stage_state(db: str, stage: str, config: dict, *, overwrite: bool = False) -> str:
    """'new', 'resume' (same config, unfinished) or 'complete'; refuses a different config.

    With ``overwrite`` a different config drops the stage's record and every later stage's, so
    the caller rebuilds them.
    """
    manifest = read_manifest(db)
    record = manifest["stages"].get(stage)
    if record is None:
        return "new"
    if record.get("config") != config:
        if not overwrite:
            old = record.get("config", {})
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ConfigMismatch(
                f"{join(db, MANIFEST)}: stage {stage!r} was built with a different config "
                f"(differs in: {', '.join(diff)}). Use another DB, or pass --overwrite to rebuild it."
            )
        later = STAGES[STAGES.index(stage):] if stage in STAGES else (stage,)
        for name in later:
            manifest["stages"].pop(name, None)
        if stage == STAGES[0]:  # new chunk ids: deletions and increments refer to the old ones
            manifest["stages"].pop("deletions", None)
            manifest.pop("increments", None)
        write_manifest(db, manifest)
        log.warning("stage %r: config changed, rebuilding it and the stages after it", stage)
        return "new"
    return "complete" if record.get("status") == "complete" else "resume"
