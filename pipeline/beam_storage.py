"""``retro_db.storage`` for bucket URIs through Beam's ``FileSystems``: the build's driver then
reaches buckets with the same options (``--s3_endpoint_url``, credentials) as its Beam workers."""

from __future__ import annotations

from typing import BinaryIO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from retro_db import storage


class BeamStorage:
    def open_input(self, path: str) -> BinaryIO:
        return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)

    def open_output(self, path: str) -> BinaryIO:
        return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)

    def exists(self, path: str) -> bool:
        return FileSystems.exists(path) or bool(self.list_files(path))

    def rename(self, src: str, dst: str) -> None:
        FileSystems.rename([src], [dst])

    def delete(self, paths: list[str]) -> None:
        if paths:
            FileSystems.delete(list(paths))

    def list_files(self, prefix: str) -> dict[str, int]:
        prefix = prefix.rstrip("/") + "/"
        try:
            results = FileSystems.match([prefix + "**"])
        except Exception:  # nothing there yet
            return {}
        return {m.path[len(prefix) :]: m.size_in_bytes for r in results for m in r.metadata_list}


def use_beam_filesystems(beam_args: list[str]) -> None:
    """Beam's filesystems, configured by ``beam_args``, for every bucket URI the driver touches."""
    FileSystems.set_options(PipelineOptions(beam_args))
    storage.use_for_uris(BeamStorage())
