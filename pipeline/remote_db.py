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


def _local_is_ahead(db: str, local: str) -> bool:
    """The local manifest extends the bucket's (same chunk stage, later stages further along): keep
    it, so an interrupted stage resumes from its local blocks instead of starting over."""
    if not os.path.exists(layout.manifest_path(local)):
        return False
    return mf.read_manifest(local)["stages"].get("chunks") == mf.read_manifest(db)["stages"].get("chunks")


def download_db(db: str, local: str) -> int:
    """Copies every file of ``db`` missing locally (or of another size); returns the count."""
    copied, keep_manifest, remote = 0, _local_is_ahead(db, local), storage.storage_for(db)
    for relative, size in sorted(remote.list_files(db).items()):
        target = os.path.join(local, relative)
        if relative == layout.MANIFEST:
            if keep_manifest:
                continue
        elif _skipped(relative) or (os.path.exists(target) and os.path.getsize(target) == size):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with remote.open_input(storage.join(db, relative)) as src, open(target + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(target + ".tmp", target)
        copied += 1
    log.info("mirror: %d files from %s to %s", copied, db, local)
    return copied


def upload_db(local: str, db: str) -> int:
    """Copies every local file missing in ``db`` (or of another size), the manifest last; returns the count."""
    store = storage.storage_for(db)
    remote = store.list_files(db)
    todo = []
    for directory, _, files in os.walk(local):
        for name in files:
            relative = os.path.relpath(os.path.join(directory, name), local).replace(os.sep, "/")
            if not _skipped(relative) and relative != layout.MANIFEST and remote.get(relative) != os.path.getsize(os.path.join(local, relative)):
                todo.append(relative)
    for relative in sorted(todo) + [layout.MANIFEST]:
        with open(os.path.join(local, relative), "rb") as src, store.open_output(storage.join(db, relative)) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    log.info("mirror: %d files from %s to %s", len(todo) + 1, local, db)
    return len(todo) + 1
