"""Retroactive filtering: documents removed from retrieval and training, audited and reversible.

    DB/deleted/audit.jsonl   the log: one JSON line per deletion or restoration
                             {seq, time, action, actor, reason, doc_ids, copies, documents, chunks}
    DB/deleted/state.npz     what is deleted now: doc_ids, chunk_ids (sorted int64), seq of the last entry applied

The log is the record of truth and is written first (appended and fsynced); the state is derived
from it and replaces its file atomically, so readers see the old or the new list, never half of
one. A writer killed between the two leaves an entry the state lacks: the next writer, and
``recover`` (which the service runs when it starts), replay the log, so the log and the list
always agree once anyone writes again. A line torn by a crash mid-append was never acknowledged
and is cut off. Writers hold ``DB/deleted/.lock``, so concurrent deleters (several service
replicas, the CLI) never lose an update. Nothing outside ``DB/deleted`` is written: a deployment
can mount the DB read-only and this directory writable.

Searches exclude the chunk ids inside faiss (``retro_db.search.deleted_selector``), training
sequences skip them (``model.data``), and readers notice a change by the state file's stat signature.
A whole document is removed, so a surviving chunk's continuation (same document) never is.
Its exact copies (the same normalised text: the build keeps copies of train documents for
retrieval) go and come back with it: an entry's ``copies`` lists them beside the ``doc_ids`` asked.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import re
import socket
import time

import numpy as np

from retro_db import layout
from retro_db import manifest as mf
from retro_db.documents import DocumentCatalog
from retro_db.failpoints import failpoint

log = logging.getLogger(__name__)

DELETE, RESTORE = "delete", "restore"


class NotDeleted(ValueError):
    """A restoration named documents that are not deleted."""


class UnknownDocuments(ValueError):
    """Document ids that exist nowhere in the DB."""


def cli_actor() -> str:
    """Who the audit log names for a change made with the CLI (file-system access is its authority)."""
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


def _state(db: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(deleted doc ids, their chunk ids, seq of the last log entry applied)."""
    path = layout.deleted_path(db, layout.DELETIONS_STATE)
    if not os.path.exists(path):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    with np.load(path) as state:
        return state["doc_ids"], state["chunk_ids"], int(state["seq"])


def deleted(db: str) -> tuple[np.ndarray, np.ndarray]:
    """(deleted doc ids, their chunk ids) from one read of the state file."""
    return _state(db)[:2]


def deleted_chunk_ids(db: str) -> np.ndarray:
    return _state(db)[1]


def deleted_doc_ids(db: str) -> np.ndarray:
    return _state(db)[0]


def deletions_signature(db: str) -> tuple:
    """Changes whenever the deleted list is rewritten (a new file replaces the old one)."""
    return mf.stat_signature(layout.deleted_path(db, layout.DELETIONS_STATE))


def _read_log(path: str) -> tuple[list[dict], int]:
    """(complete entries, byte length of the complete lines): a torn last line is not an entry."""
    if not os.path.exists(path):
        return [], 0
    with open(path, "rb") as f:
        data = f.read()
    entries, end = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break
        end += len(line)
    return entries, end


def audit_log(db: str, *, since: int = 0, limit: int | None = None) -> list[dict]:
    """Log entries with seq > ``since``, oldest first (at most ``limit``)."""
    entries = [e for e in _read_log(layout.deleted_path(db, layout.DELETIONS_AUDIT))[0] if e["seq"] > since]
    return entries[:limit] if limit is not None else entries


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_state(db: str, doc_ids: np.ndarray, chunk_ids: np.ndarray, seq: int) -> None:
    path = layout.deleted_path(db, layout.DELETIONS_STATE)
    tmp = path + ".tmp.npz"
    with open(tmp, "wb") as f:
        np.savez(f, doc_ids=doc_ids.astype(np.int64), chunk_ids=chunk_ids.astype(np.int64), seq=np.int64(seq))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _replay(entries: list[dict]) -> np.ndarray:
    docs = np.zeros(0, np.int64)
    for e in entries:
        ids = np.asarray(e["doc_ids"] + e.get("copies", []), np.int64)
        docs = np.union1d(docs, ids) if e["action"] == DELETE else np.setdiff1d(docs, ids)
    return docs


@contextlib.contextmanager
def _locked_log(db: str, store):
    """Holds the lock; yields the log's entries with the state brought up to date with them."""
    directory = os.path.join(db, layout.DELETED)
    os.makedirs(directory, exist_ok=True)
    audit = layout.deleted_path(db, layout.DELETIONS_AUDIT)
    with open(layout.deleted_path(db, layout.DELETIONS_LOCK), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries, end = _read_log(audit)
        if os.path.exists(audit) and os.path.getsize(audit) != end:
            log.warning(
                "%s: cutting a torn last line (a writer was killed mid-append; that change was never acknowledged)",
                audit,
            )
            os.truncate(audit, end)
        seq = entries[-1]["seq"] if entries else 0
        if _state(db)[2] != seq:
            docs = _replay(entries)
            log.warning(
                "%s: the deleted list lags the log (a writer was killed between them); replayed %d entries",
                directory,
                len(entries),
            )
            _write_state(db, docs, store.chunks_of_documents(docs)[0], seq)
        yield entries


def recover(db: str, store) -> None:
    """Brings the deleted list up to date with the log (after a writer was killed between them)."""
    if os.path.exists(layout.deleted_path(db, layout.DELETIONS_AUDIT)):
        with _locked_log(db, store):
            pass


def change(db: str, doc_ids, store, *, action: str, reason: str, actor: str) -> dict:
    """Deletes or restores documents, logged; returns the log entry with the totals after it.

    ``store`` is the DB's ``TokenStore`` (it maps documents to their chunks). Unknown ids raise
    ``UnknownDocuments``; restoring a document that is not deleted raises ``NotDeleted``; an empty reason ValueError.
    """
    if action not in (DELETE, RESTORE):
        raise ValueError(f"action {action!r}: use {DELETE} or {RESTORE}")
    if not reason or re.fullmatch(r"\s*", reason, re.ASCII):
        raise ValueError("a reason is required: the audit log records why documents were deleted or restored")
    ids = np.unique(np.asarray(doc_ids, dtype=np.int64))
    if not len(ids):
        raise ValueError("no document ids given")
    _, unknown = store.chunks_of_documents(ids)
    if len(unknown):
        raise UnknownDocuments(f"unknown document ids: {unknown[:10].tolist()}")
    copies = np.asarray(DocumentCatalog(db).copies(ids), dtype=np.int64)
    with _locked_log(db, store) as entries:
        before = _state(db)[0]
        if action == DELETE:
            both = np.union1d(ids, copies)
            changed, after = np.setdiff1d(both, before), np.union1d(before, both)
        else:
            if len(absent := np.setdiff1d(ids, before)):
                raise NotDeleted(f"documents not deleted, so not restorable: {absent[:10].tolist()}")
            copies = np.intersect1d(copies, before)
            changed = np.union1d(ids, copies)
            after = np.setdiff1d(before, changed)
        entry = {
            "seq": (entries[-1]["seq"] if entries else 0) + 1,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "action": action,
            "actor": actor,
            "reason": reason,
            "doc_ids": ids.tolist(),
            "copies": copies.tolist(),
            "documents": int(len(changed)),
            "chunks": int(len(store.chunks_of_documents(changed)[0])),
        }
        # the log first: it is the record of truth
        with open(layout.deleted_path(db, layout.DELETIONS_AUDIT), "ab") as f:
            f.write((json.dumps(entry, sort_keys=True) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        failpoint("deletion-logged")
        chunks = store.chunks_of_documents(after)[0]
        _write_state(db, after, chunks, entry["seq"])
    log.info(
        "%s #%d by %s: %d documents (%d chunks); %d documents deleted now",
        action,
        entry["seq"],
        actor,
        entry["documents"],
        entry["chunks"],
        len(after),
    )
    return {**entry, "total_documents_deleted": int(len(after)), "total_chunks_deleted": int(len(chunks))}


def delete_documents(db: str, doc_ids, store, *, reason: str, actor: str) -> dict:
    return change(db, doc_ids, store, action=DELETE, reason=reason, actor=actor)
