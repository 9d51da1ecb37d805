"""Files of a DB on a local disk or in a bucket, behind one small interface.

Local paths go to ``os``; URIs (``s3://``, ``gs://``, ``hdfs://``, ...) to ``pyarrow.fs``, which
takes its credentials and endpoint from the usual environment (``AWS_ENDPOINT_URL`` and friends).
The build pipeline swaps in Beam's ``FileSystems`` for URIs (``pipeline.beam_storage``), so that the
driver reaches buckets with the same options as its Beam workers. Readers of a DB never need Beam.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import BinaryIO, Protocol

import pyarrow.fs


def is_remote(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


class Storage(Protocol):
    def open_input(self, path: str) -> BinaryIO: ...

    def open_output(self, path: str) -> BinaryIO: ...

    def exists(self, path: str) -> bool: ...

    def rename(self, src: str, dst: str) -> None:
        """Moves ``src`` over ``dst`` (replacing it): atomic on a local disk."""

    def delete(self, paths: list[str]) -> None:
        """Deletes files, or directories with all they hold."""

    def list_files(self, prefix: str) -> dict[str, int]:
        """Every file under ``prefix``, recursively: path relative to it -> size ({} when none)."""


class LocalStorage:
    def open_input(self, path: str) -> BinaryIO:
        return open(path, "rb")

    def open_output(self, path: str) -> BinaryIO:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return open(path, "wb")

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    def list_files(self, prefix: str) -> dict[str, int]:
        found = {}
        for directory, _, files in os.walk(prefix):
            for name in files:
                path = os.path.join(directory, name)
                found[os.path.relpath(path, prefix).replace(os.sep, "/")] = os.path.getsize(path)
        return found


class ArrowStorage:
    """Buckets through ``pyarrow.fs`` (S3, GCS, HDFS; one filesystem object per bucket)."""

    def __init__(self):
        self._filesystems: dict[str, object] = {}

    def _resolve(self, uri: str):
        scheme, rest = uri.split("://", 1)
        key = f"{scheme}://{rest.split('/', 1)[0]}"
        if key not in self._filesystems:
            self._filesystems[key] = pyarrow.fs.FileSystem.from_uri(uri)[0]
        return self._filesystems[key], rest.rstrip("/")

    def open_input(self, path: str) -> BinaryIO:
        fs, p = self._resolve(path)
        return fs.open_input_stream(p, compression=None)

    def open_output(self, path: str) -> BinaryIO:
        fs, p = self._resolve(path)
        return fs.open_output_stream(p, compression=None)

    def exists(self, path: str) -> bool:
        fs, p = self._resolve(path)
        if fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound:
            return True
        return bool(self.list_files(path))  # a "directory" on an object store is a prefix

    def rename(self, src: str, dst: str) -> None:
        fs, s = self._resolve(src)
        fs.move(s, self._resolve(dst)[1])

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            fs, p = self._resolve(path)
            kind = fs.get_file_info(p).type
            if kind == pyarrow.fs.FileType.File:
                fs.delete_file(p)
            elif kind == pyarrow.fs.FileType.Directory or self.list_files(path):
                fs.delete_dir(p)

    def list_files(self, prefix: str) -> dict[str, int]:
        fs, p = self._resolve(prefix)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(p, recursive=True))
        except (FileNotFoundError, OSError):
            return {}
        return {i.path[len(p) + 1 :]: i.size for i in infos if i.type == pyarrow.fs.FileType.File}


_LOCAL = LocalStorage()
_remote: Storage = ArrowStorage()


def use_for_uris(storage: Storage) -> None:
    """Routes every bucket URI to ``storage`` from now on (the build pipeline installs Beam's)."""
    global _remote
    _remote = storage


def storage_for(path: str) -> Storage:
    return _remote if is_remote(path) else _LOCAL


def read_bytes(path: str) -> bytes:
    with storage_for(path).open_input(path) as f:
        return f.read()


def write_atomically(path: str, data: bytes) -> None:
    """Temp file then rename: a reader sees the old file or the new one, never half of one."""
    storage, tmp = storage_for(path), path + ".tmp"
    with storage.open_output(tmp) as f:
        f.write(data)
    storage.rename(tmp, path)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with storage_for(path).open_input(path) as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
