"""Token shards (``DB/tokens``): each chunk shard's tokens as padded .npy arrays, for O(1) reads
by ``retro_db.token_store``. Written once per chunk shard, at the start of the embeddings stage."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from retro_db import layout
from retro_db.token_store import read_chunk_shard


def write_token_shard(chunk_file: str, *, chunk_size: int, pad_id: int) -> str:
    """Writes one chunk shard's padded tokens (n, m), lengths and doc ids as .npy files; returns the folder."""
    out = layout.aligned_path(chunk_file, layout.TOKENS)
    if os.path.exists(os.path.join(out, layout.TOKEN_META)):
        return out
    table = read_chunk_shard(chunk_file)
    lists = table["tokens"].combine_chunks()
    lengths = np.diff(lists.offsets.to_numpy()).astype(np.int16)
    values = lists.values.to_numpy()
    dtype = np.uint16 if values.dtype == np.uint16 else np.uint32
    tokens = np.full((len(lengths), chunk_size), pad_id, dtype=dtype)
    mask = np.arange(chunk_size)[None, :] < lengths[:, None]
    tokens[mask] = values
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    for name, array in zip(layout.TOKEN_ARRAYS, (tokens, lengths, table["doc_id"].to_numpy())):
        np.save(os.path.join(tmp, name), array)
    ids = table["chunk_id"].to_numpy()
    meta = {"first_chunk_id": int(ids[0]) if len(ids) else 0, "rows": len(ids)}
    if len(ids) and not np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        raise ValueError(f"{chunk_file}: chunk ids are not dense; the shard is corrupt")
    with open(os.path.join(tmp, layout.TOKEN_META), "w") as f:
        json.dump(meta, f)
    if os.path.exists(out):  # a crash after an earlier rename left a partial directory
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
