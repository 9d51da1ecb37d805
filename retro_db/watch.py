"""Noticing that a served DB changed: its manifest (an increment added, an index rebuilt) or its deletions.

Two ``stat`` calls per check, so a server can check before every batch: what is loaded is reloaded
only when a file was replaced or rewritten, and a deletion or an added increment reaches every
replica without a restart.
"""

from __future__ import annotations

from retro_db import deletions, layout
from retro_db import manifest as mf


class DBWatch:
    """Each method answers whether its part of the DB changed since it last answered (True at first)."""

    def __init__(self, db: str):
        self.db = db
        self._manifest = self._deleted = None

    def manifest_changed(self) -> bool:
        sig = mf.stat_signature(layout.manifest_path(self.db))
        changed, self._manifest = sig != self._manifest, sig
        return changed

    def deletions_changed(self) -> bool:
        sig = deletions.deletions_signature(self.db)
        changed, self._deleted = sig != self._deleted, sig
        return changed
