"""Where a chunk came from: a document's source file, line or row, and the record's metadata.

``DB/documents/<split>/shard-*.parquet`` (and each increment's) hold one row per kept document,
in doc id order, written with doc id statistics per row group. A lookup reads the Parquet
footers once and then only the row groups that hold the asked ids, so the catalog costs a few
bytes per row group whatever the DB's size.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow.parquet as pq

from retro_db import layout
from retro_db.manifest import db_roots

COLUMNS = ("doc_id", "doc_hash", "source", "position", "meta")


class DocumentCatalog:
    """doc id -> {doc_id, source, position, meta} for a local DB and its increments."""

    def __init__(self, db: str):
        groups = []  # (first doc id, last doc id, file, row group)
        for root in db_roots(db):
            for path in layout.document_shard_files(root):
                meta = pq.ParquetFile(path).metadata
                column = meta.schema.to_arrow_schema().get_field_index("doc_id")
                for g in range(meta.num_row_groups):
                    stats = meta.row_group(g).column(column).statistics
                    if meta.row_group(g).num_rows and stats is not None and stats.has_min_max:
                        groups.append((stats.min, stats.max, path, g))
        groups.sort()
        self.first = np.array([g[0] for g in groups], dtype=np.int64)
        self.last = np.array([g[1] for g in groups], dtype=np.int64)
        self.where = [(g[2], g[3]) for g in groups]

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _row_group(path: str, group: int) -> tuple[np.ndarray, list[dict]]:
        table = pq.ParquetFile(path).read_row_group(group, columns=list(COLUMNS))
        return table["doc_id"].to_numpy(), table.to_pylist()

    def _rows(self, doc_ids):
        """(doc id, its row) for the documents found among ``doc_ids``."""
        for doc in {int(d) for d in doc_ids}:
            g = int(np.searchsorted(self.first, doc, side="right")) - 1
            if g < 0 or doc > self.last[g]:
                continue
            ids, rows = self._row_group(*self.where[g])
            i = int(np.searchsorted(ids, doc))
            if i < len(ids) and ids[i] == doc:
                yield doc, rows[i]

    def copies(self, doc_ids) -> list[int]:
        """The other documents with the same normalised text as any of ``doc_ids`` (the build keeps
        exact copies of train documents for retrieval; increments may hold more)."""
        asked = {doc: row["doc_hash"] for doc, row in self._rows(doc_ids)}
        return sorted({d for ids in self.with_hashes(asked.values()).values() for d in ids} - set(asked))

    def describe(self, doc_ids) -> dict[int, dict]:
        """The documents found among ``doc_ids``, by id; ``meta`` parsed from its JSON."""
        out = {}
        for doc, row in self._rows(doc_ids):
            try:
                meta = json.loads(row["meta"]) if row["meta"] else {}
            except ValueError:  # the record's meta is kept as it came; a non-JSON one is shown as text
                meta = {"text": row["meta"]}
            out[doc] = {
                "doc_id": doc,
                "source": row["source"],
                "position": row["position"],
                "meta": meta if isinstance(meta, dict) else {"value": meta},
            }
        return out

    def with_hashes(self, doc_hashes) -> dict[str, list[int]]:
        """doc hash (hex) -> ids of the DB documents with that normalised text, for the hashes asked
        (a filtered scan of the hash column: nothing else of the catalog is read)."""
        wanted = sorted({str(h) for h in doc_hashes})
        out: dict[str, list[int]] = {}
        if not wanted:
            return out
        for path in sorted({p for p, _ in self.where}):
            table = pq.read_table(path, columns=["doc_id", "doc_hash"], filters=[("doc_hash", "in", wanted)])
            for doc_id, doc_hash in zip(table["doc_id"].to_pylist(), table["doc_hash"].to_pylist()):
                out.setdefault(doc_hash, []).append(doc_id)
        return out
