"""Retroactive filtering: documents removed from retrieval without rebuilding anything.

``DB/deleted/doc_ids.npy`` and ``DB/deleted/chunk_ids.npy`` (sorted int64) list what was removed;
each write replaces the files atomically under a lock, so concurrent deleters never lose an update
and readers see the old or the new list, never half of one. Searches exclude the chunk ids inside
faiss (``faiss_index.deleted_selector``); readers notice a change by the file's stat signature.
A whole document is removed, so a surviving chunk's continuation (same document) never is.
"""

from __future__ import annotations

import fcntl
import logging
import os

import numpy as np

log = logging.getLogger(__name__)

DIR = "deleted"


def _path(db: str, name: str) -> str:
    return os.path.join(db, DIR, f"{name}.npy")


def _load(db: str, name: str) -> np.ndarray:
    path = _path(db, name)
    return np.load(path) if os.path.exists(path) else np.zeros(0, dtype=np.int64)


def deleted_chunk_ids(db: str) -> np.ndarray:
    return _load(db, "chunk_ids")


def deleted_doc_ids(db: str) -> np.ndarray:
    return _load(db, "doc_ids")


def deletions_signature(db: str) -> tuple:
    """Changes whenever the deleted list is rewritten (a new file replaces the old one)."""
    from pipeline.manifest import stat_signature

    return stat_signature(_path(db, "chunk_ids"))


def _save_atomically(array: np.ndarray, path: str) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def delete_documents(db: str, doc_ids, store) -> dict:
    """Adds documents to the deleted list (persisted); returns counts. Unknown ids raise KeyError.

    ``store`` is the DB's ``TokenStore`` (it maps documents to their chunks).
    """
    from pipeline import manifest as mf

    chunk_ids, unknown = store.chunks_of_documents(doc_ids)
    if len(unknown):
        raise KeyError(f"unknown document ids: {unknown[:10].tolist()}")
    os.makedirs(os.path.join(db, DIR), exist_ok=True)
    with open(os.path.join(db, DIR, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        docs_before, chunks_before = deleted_doc_ids(db), deleted_chunk_ids(db)
        docs = np.union1d(docs_before, np.asarray(doc_ids, dtype=np.int64))
        chunks = np.union1d(chunks_before, chunk_ids)
        _save_atomically(docs, _path(db, "doc_ids"))
        _save_atomically(chunks, _path(db, "chunk_ids"))  # written last: readers watch this one
        mf.update_stage(db, "deletions", documents=len(docs), chunks=len(chunks), sha256=mf.sha256_file(_path(db, "chunk_ids")))
    log.info("deleted %d documents (%d chunks); %d documents deleted in all", len(docs) - len(docs_before),
             len(chunks) - len(chunks_before), len(docs))
    return {"documents_deleted": int(len(docs) - len(docs_before)), "chunks_deleted": int(len(chunks) - len(chunks_before)),
            "total_documents_deleted": int(len(docs)), "total_chunks_deleted": int(len(chunks))}
