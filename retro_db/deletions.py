"""Retroactive filtering: documents removed from retrieval without rebuilding anything.

``DB/deleted/doc_ids.npy`` and ``DB/deleted/chunk_ids.npy`` (sorted int64) list what was removed;
each write replaces the files atomically under a lock, so concurrent deleters never lose an update
and readers see the old or the new list, never half of one. Searches exclude the chunk ids inside
faiss (``retro_db.search.deleted_selector``); readers notice a change by the file's stat signature.
A whole document is removed, so a surviving chunk's continuation (same document) never is.
"""

from __future__ import annotations

import fcntl
import logging
import os

import numpy as np

from retro_db import layout
from retro_db import manifest as mf
from retro_db.storage import sha256_file

log = logging.getLogger(__name__)


def _load(db: str, name: str) -> np.ndarray:
    path = layout.deleted_path(db, name)
    return np.load(path) if os.path.exists(path) else np.zeros(0, dtype=np.int64)


def deleted_chunk_ids(db: str) -> np.ndarray:
    return _load(db, layout.DELETED_CHUNK_IDS)


def deleted_doc_ids(db: str) -> np.ndarray:
    return _load(db, layout.DELETED_DOC_IDS)


def deletions_signature(db: str) -> tuple:
    """Changes whenever the deleted list is rewritten (a new file replaces the old one)."""
    return mf.stat_signature(layout.deleted_path(db, layout.DELETED_CHUNK_IDS))


def _save_atomically(array: np.ndarray, path: str) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def delete_documents(db: str, doc_ids, store) -> dict:
    """Adds documents to the deleted list (persisted); returns counts. Unknown ids raise KeyError.

    ``store`` is the DB's ``TokenStore`` (it maps documents to their chunks).
    """
    chunk_ids, unknown = store.chunks_of_documents(doc_ids)
    if len(unknown):
        raise KeyError(f"unknown document ids: {unknown[:10].tolist()}")
    os.makedirs(os.path.join(db, layout.DELETED), exist_ok=True)
    with open(layout.deleted_path(db, layout.DELETIONS_LOCK), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        docs_before, chunks_before = deleted_doc_ids(db), deleted_chunk_ids(db)
        docs = np.union1d(docs_before, np.asarray(doc_ids, dtype=np.int64))
        chunks = np.union1d(chunks_before, chunk_ids)
        _save_atomically(docs, layout.deleted_path(db, layout.DELETED_DOC_IDS))
        _save_atomically(chunks, layout.deleted_path(db, layout.DELETED_CHUNK_IDS))  # written last: readers watch this one
        mf.update_stage(db, "deletions", documents=len(docs), chunks=len(chunks),
                        sha256=sha256_file(layout.deleted_path(db, layout.DELETED_CHUNK_IDS)))
    log.info("deleted %d documents (%d chunks); %d documents deleted in all", len(docs) - len(docs_before),
             len(chunks) - len(chunks_before), len(docs))
    return {"documents_deleted": int(len(docs) - len(docs_before)), "chunks_deleted": int(len(chunks) - len(chunks_before)),
            "total_documents_deleted": int(len(docs)), "total_chunks_deleted": int(len(chunks))}
