"""The stage protocol every build stage follows, so that reruns are safe.

A stage's manifest record holds its config and the fingerprints of what it read (tokenizer,
model weights, input files, the previous stage's shard hashes). ``Stage`` compares them with the
record of an earlier run: the same ones resume or skip, different ones are refused (naming the
fields that differ) unless the caller asks to overwrite, which drops this stage's outputs and
records and every later stage's, so outputs of two configs are never mixed. Each stage marks itself
running, then complete with the hashes of its shards.

    embeddings = completed(db, "embeddings")     # the stage this one reads, or DBNotReady
    stage = Stage(db, "index", config, fingerprints={...}, overwrite=overwrite)
    if done := stage.finished(outputs):
        return done
    stage.start(wipe=[join(db, "index")])
    ...                                   # the stage's own work
    return stage.complete(shards=[stage.shard(p) for p in outputs], ...)
"""

from __future__ import annotations

import dataclasses
import logging
import os

from retro_db import layout, storage
from retro_db import manifest as mf

log = logging.getLogger(__name__)

COMMANDS = {"chunks": "chunks", "embeddings": "embed", "index": "index", "neighbours": "neighbours"}


class ConfigMismatch(RuntimeError):
    pass


def completed(db: str, name: str) -> dict:
    """The manifest record of a complete stage (the one a later stage reads); else DBNotReady
    naming the command that builds it."""
    hint = f"`python -m pipeline {COMMANDS[name]} --db {{db}}` or make build-db DB={{db}}"
    return mf.require_stages(db, (name,), hint=hint)["stages"][name]


class Stage:
    """One stage's bookkeeping in ``DB/manifest.json``; ``state`` is 'new', 'resume' or 'complete';
    ``previous`` is the record an earlier run with this config left (None when the stage is new)."""

    def __init__(self, db: str, name: str, config, *, fingerprints: dict | None = None, overwrite: bool = False):
        self.db, self.name = db, name
        self.record = {**dataclasses.asdict(config), **(fingerprints or {})}
        self.previous: dict | None = None
        self.state = self._state(overwrite)

    def _state(self, overwrite: bool) -> str:
        manifest = mf.read_manifest(self.db)
        record = manifest["stages"].get(self.name)
        if record is None:
            return "new"
        if record.get("config") == self.record:
            self.previous = record
            return "complete" if record.get("status") == "complete" else "resume"
        old = record.get("config", {})
        if not overwrite:
            diff = sorted(k for k in set(old) | set(self.record) if old.get(k) != self.record.get(k))
            raise ConfigMismatch(
                f"{layout.manifest_path(self.db)}: stage {self.name!r} was built with a different config "
                f"(differs in: {', '.join(diff)}). Use another DB, or pass --overwrite to rebuild it."
            )
        later = mf.STAGES[mf.STAGES.index(self.name) :] if self.name in mf.STAGES else (self.name,)
        for name in later:
            manifest["stages"].pop(name, None)
        # new chunk ids: increments (and deletions, wiped by the stage) refer to the old ones
        if self.name == mf.STAGES[0]:
            manifest.pop("increments", None)
        mf.write_manifest(self.db, manifest)
        log.warning("stage %r: config changed, rebuilding it and the stages after it", self.name)
        return "new"

    def finished(self, outputs: list[str]) -> dict | None:
        """The stage's record when an earlier run completed it with this config and every output is
        still there (the caller skips); else None."""
        if self.state != "complete":
            return None
        missing = [p for p in outputs if not storage.storage_for(p).exists(p)]
        if missing:
            log.warning("%s: %d outputs are missing (%s...), rebuilding them", self.name, len(missing), missing[0])
            return None
        log.info("%s: complete with the same config, skipping", self.name)
        return self.previous

    def start(self, *, wipe: list[str] = ()) -> None:
        """Marks the stage running; a new one first deletes what an older config left in ``wipe``."""
        if self.state == "new":
            for path in wipe:
                delete_tree(path)
        mf.update_stage(self.db, self.name, config=self.record, status="running")

    def update(self, **fields) -> dict:
        """Records progress a rerun may rely on (e.g. the trained index's timing) before completion."""
        return mf.update_stage(self.db, self.name, **fields)

    def shard(self, path: str, **fields) -> dict:
        """A shard's manifest entry: its path relative to the DB and its sha256."""
        relative = path[len(self.db.rstrip("/")) + 1 :] if storage.is_remote(path) else os.path.relpath(path, self.db)
        return {"path": relative, **fields, "sha256": storage.sha256_file(path), "status": "complete"}

    def complete(self, **fields) -> dict:
        return mf.update_stage(self.db, self.name, config=self.record, status="complete", **fields)


def delete_tree(path: str) -> None:
    """Deletes a directory, or on object stores (no directories) every object under the prefix."""
    store = storage.storage_for(path)
    if storage.is_remote(path):
        store.delete([storage.join(path, relative) for relative in store.list_files(path)])
    else:
        store.delete([path])


def config_of(cls, record: dict):
    """A stage's config dataclass from its manifest record (the record's fingerprints left out)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in record["config"].items() if k in fields})
