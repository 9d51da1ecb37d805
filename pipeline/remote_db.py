"""DBs at bucket URIs (s3://, gs://, hdfs://, anything ``retro_db.storage`` reaches).

The Beam stage reads the corpus and writes chunk shards straight to the bucket (its workers may be
anywhere). The Ray and faiss stages work on a local mirror of the DB, because faiss reads and
writes local files and memory-maps them: ``download_db`` brings down what exists (so a rerun
resumes), the stage runs, ``upload_db`` sends new or changed files back, the manifest last, so the
bucket's manifest never names a file the bucket lacks. When Ray spans several nodes the mirror
(``--work-dir``) must be a path every node mounts (a shared volume), as for any local DB.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

from retro_db import layout, storage
from retro_db import manifest as mf

log = logging.getLogger(__name__)


def default_work_dir(db: str) -> str:
    """A local mirror directory per DB URI, under ~/.cache/retro-db (or $RETRO_WORK_DIR)."""
    root = os.environ.get("RETRO_WORK_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "retro-db")
    return os.path.join(root, hashlib.sha256(db.rstrip("/").encode()).hexdigest()[:16])


def _skipped(relative: str) -> bool:
    """Work files that never leave the machine: temp files, embedding blocks, locks."""
    parts = relative.split("/")
    return any(p.startswith(".") or p.endswith(".blocks") or ".tmp" in p for p in parts)


def recorded_hashes(manifest: dict) -> dict[str, str]:
    """{path relative to the DB: sha256} of every file the manifest records a hash of."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and isinstance(node.get("sha256"), str):
                found[node["path"]] = node["sha256"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    return found


# Small files the manifest has no hash of (the deletions' state and log, the tokenizer) are always
# copied: a rewrite of the same size would otherwise be missed, and copying them costs nothing.
ALWAYS_COPIED_BYTES = 1 << 20


def _same(local_path: str, size: int, sha256: str | None) -> bool:
    """A local file matches what the other side holds: by the manifest's sha256 where it records
    one (a file rewritten to the same size is caught), else by size for large files."""
    if not os.path.exists(local_path):
        return False
    if sha256 is not None:
        return storage.sha256_file(local_path) == sha256
    return size > ALWAYS_COPIED_BYTES and os.path.getsize(local_path) == size


def _local_is_ahead(db: str, local: str) -> bool:
    """The local manifest extends the bucket's (same chunk stage, later stages further along): keep
    it, so an interrupted stage resumes from its local blocks instead of starting over."""
    if not os.path.exists(layout.manifest_path(local)):
        return False
    return mf.read_manifest(local)["stages"].get("chunks") == mf.read_manifest(db)["stages"].get("chunks")


def _local_files(local: str) -> dict[str, int]:
    files = {}
    for directory, _, names in os.walk(local):
        for name in names:
            relative = os.path.relpath(os.path.join(directory, name), local).replace(os.sep, "/")
            if not _skipped(relative):
                files[relative] = os.path.getsize(os.path.join(local, relative))
    return files


def download_db(db: str, local: str) -> int:
    """Copies every file of ``db`` that differs locally (the bucket manifest's sha256, else size) and
    removes local files the bucket no longer has (unless the local mirror is ahead); returns the count copied."""
    copied, keep_manifest, remote = 0, _local_is_ahead(db, local), storage.storage_for(db)
    listed = remote.list_files(db)
    hashes = recorded_hashes(mf.read_manifest(db))
    for relative, size in sorted(listed.items()):
        target = os.path.join(local, relative)
        if relative == layout.MANIFEST:
            if keep_manifest:
                continue
        elif _skipped(relative) or _same(target, size, hashes.get(relative)):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with remote.open_input(storage.join(db, relative)) as src, open(target + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(target + ".tmp", target)
        copied += 1
    stale = [] if keep_manifest else sorted(set(_local_files(local)) - set(listed))
    for relative in stale:
        os.remove(os.path.join(local, relative))
    log.info("mirror: %d files from %s to %s, %d stale local files removed", copied, db, local, len(stale))
    return copied


def upload_db(local: str, db: str) -> int:
    """Copies every local file that differs in ``db`` (by the sha256 the bucket's manifest records,
    else size), the manifest last, then removes bucket files the local DB no longer has; returns the count copied."""
    store = storage.storage_for(db)
    remote = store.list_files(db)
    remote_hashes = recorded_hashes(mf.read_manifest(db)) if layout.MANIFEST in remote else {}
    local_hashes = recorded_hashes(mf.read_manifest(local))
    files = _local_files(local)
    todo = []
    for relative, size in files.items():
        if relative == layout.MANIFEST:
            continue
        theirs, mine = remote_hashes.get(relative), local_hashes.get(relative)
        if relative not in remote or size <= ALWAYS_COPIED_BYTES and mine is None:
            todo.append(relative)
        elif theirs is not None and mine is not None:
            if theirs != mine:
                todo.append(relative)
        elif remote[relative] != size:
            todo.append(relative)
    for relative in sorted(todo) + [layout.MANIFEST]:
        with open(os.path.join(local, relative), "rb") as src, store.open_output(storage.join(db, relative)) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    # after the manifest: the bucket's manifest never names a file the bucket lacks
    stale = sorted(r for r in set(remote) - set(files) if not _skipped(r))
    if stale:
        store.delete([storage.join(db, r) for r in stale])
    log.info("mirror: %d files from %s to %s, %d stale bucket files removed", len(todo) + 1, local, db, len(stale))
    return len(todo) + 1
