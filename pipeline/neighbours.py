"""Stage 4 (Ray): offline neighbour tables for every chunk of the train, valid and test splits.

For each chunk, search K > k candidates, drop those from the chunk's own document (by document
id, never by result position), keep the k nearest; where fewer than k survive, search again with
4x the candidates (up to ``max_candidates``), then pad with -1. Output per chunk shard:
``DB/neighbours/<split>/shard-*.parquet`` with ``chunk_id``, ``neighbour_ids`` (nearest first)
and ``distances`` (squared L2, +inf for padding), rows aligned with the chunk shard.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.actor_pool import ReportsNode, cluster_cpus_gpus, spread_actor_pool
from pipeline.stage import Stage, completed, config_of
from retro_db import layout
from retro_db import manifest as mf
from retro_db.deletions import deleted_chunk_ids
from retro_db.ray_cluster import connect_ray
from retro_db.search import RetrievalIndex, index_shard_paths, load_embedding_rows
from retro_db.storage import sha256_file
from retro_db.token_store import TokenStore, read_chunk_shard

log = logging.getLogger(__name__)


@dataclass
class NeighbourConfig:
    k_train: int = field(default=2, metadata={"help": "neighbours stored per train chunk"})
    k_eval: int = field(default=10, metadata={"help": "neighbours stored per valid/test chunk"})
    candidates: int = 32  # first search depth K (at least 4k)
    max_candidates: int = 1024
    nprobe: int = field(default=0, metadata={"help": "nprobe for neighbour search (default: the measured one)"})
    batch: int = 1024


def neighbours_of(
    index,
    queries: np.ndarray,
    query_docs: np.ndarray,
    doc_of,
    *,
    k: int,
    candidates: int,
    max_candidates: int,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest chunks from other documents. (n, k) ids (-1 padded), (n, k) distances (+inf padded).

    ``doc_of(ids) -> doc ids`` maps candidate chunk ids to their documents.
    """
    n = len(queries)
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_d = np.full((n, k), np.inf, dtype=np.float32)
    todo, depth = np.arange(n), max(candidates, 4 * k)
    while len(todo):
        dists, ids = index.search(queries[todo], min(depth, index.ntotal), nprobe=nprobe)
        valid = ids >= 0
        docs = np.full(ids.shape, -1, dtype=np.int64)
        docs[valid] = doc_of(ids[valid])
        keep = valid & (docs != query_docs[todo][:, None])
        short = []
        for row, q in enumerate(todo):
            picked = np.flatnonzero(keep[row])[:k]
            out_ids[q, : len(picked)] = ids[row, picked]
            out_d[q, : len(picked)] = dists[row, picked]
            if len(picked) < k and valid[row].all() and depth < min(max_candidates, index.ntotal):
                short.append(q)
        todo, depth = np.array(short, dtype=np.int64), depth * 4
    return out_ids, out_d


def neighbour_index_shards(db: str, include_increments: bool) -> list[str]:
    """What neighbour tables search: the DB's own index shards; increments only when asked for
    (they were never leakage-filtered with the DB's own build, and training tables should not move
    under a model because documents were added for retrieval)."""
    return index_shard_paths(db) if include_increments else layout.index_shard_files(db)


def write_neighbour_shard(path: str, chunk_ids: pa.Array, ids: np.ndarray, dists: np.ndarray) -> None:
    """One neighbour shard (rows aligned with its chunk shard), replaced atomically."""
    k = ids.shape[1]
    table = pa.Table.from_arrays(
        [
            chunk_ids,
            pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int64()), k).cast(pa.list_(pa.int64())),
            pa.FixedSizeListArray.from_arrays(pa.array(dists.reshape(-1), pa.float32()), k).cast(
                pa.list_(pa.float32())
            ),
        ],
        schema=layout.NEIGHBOUR_SCHEMA,
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path + ".tmp", compression="zstd")
    os.replace(path + ".tmp", path)


class NeighbourActor(ReportsNode):
    """Ray actor: holds the index and token store, writes one neighbour shard per call."""

    def __init__(self, db: str, threads: int, device: str, include_increments: bool = False):
        os.environ["OMP_NUM_THREADS"] = str(threads)
        self.db = db
        self.index = RetrievalIndex(
            db, shard_paths=neighbour_index_shards(db, include_increments), threads=threads, device=device
        )
        self.store = TokenStore(db)

    def write_shard(self, chunk_file: str, out_path: str, config: dict) -> tuple[str, int, int, float]:
        cfg = NeighbourConfig(**config)
        t0 = time.perf_counter()
        k = cfg.k_train if layout.split_of(chunk_file) == "train" else cfg.k_eval
        table = read_chunk_shard(chunk_file, columns=("chunk_id", "doc_id"))
        queries = np.load(layout.aligned_path(chunk_file, layout.EMBEDDINGS), mmap_mode="r")
        query_docs = table["doc_id"].to_numpy()
        ids, dists = [], []
        for s in range(0, len(queries), cfg.batch):
            i, d = neighbours_of(
                self.index,
                np.asarray(queries[s : s + cfg.batch], dtype=np.float32),
                query_docs[s : s + cfg.batch],
                self.store.doc_of,
                k=k,
                candidates=cfg.candidates,
                max_candidates=cfg.max_candidates,
                nprobe=cfg.nprobe or None,
            )
            ids.append(i)
            dists.append(d)
        ids = np.concatenate(ids) if ids else np.zeros((0, k), np.int64)
        dists = np.concatenate(dists) if dists else np.zeros((0, k), np.float32)
        write_neighbour_shard(out_path, table["chunk_id"], ids, dists)
        return out_path, len(ids), int((ids >= 0).all(axis=1).sum()), time.perf_counter() - t0


def write_neighbours(
    db: str,
    *,
    config: NeighbourConfig | None = None,
    actors: int = 0,
    overwrite: bool = False,
    device: str = "auto",
    include_increments: bool = False,
) -> dict:
    """Runs stage 4 over every chunk shard (searching on GPUs when ``device`` resolves to them);
    returns its manifest record. ``include_increments``: neighbours may come from added documents too."""
    config = config or NeighbourConfig()
    index = completed(db, "index")
    fingerprints = {
        "index_shards": [s["sha256"] for s in index["shards"]],
        "nprobe_used": config.nprobe or index["default_nprobe"],
    }
    if include_increments:
        fingerprints["increment_index_shards"] = [
            s["sha256"] for inc in mf.read_manifest(db).get("increments", []) for s in inc["index_shards"]
        ]
    stage = Stage(db, "neighbours", config, overwrite=overwrite, fingerprints=fingerprints)
    files = layout.chunk_shard_files(db, layout.SEQUENCE_SPLITS)  # retrieval-only chunks are never a query
    outs = {f: layout.aligned_path(f, layout.NEIGHBOURS) for f in files}
    if done := stage.finished(list(outs.values())):
        return done
    stage.start(wipe=[os.path.join(db, layout.NEIGHBOURS)])

    todo = [f for f in files if not os.path.exists(outs[f])]
    connect_ray()
    cpus, gpus = cluster_cpus_gpus()
    # the actors' nodes hold the GPUs (not always the driver's): Ray's count decides, each actor's faiss checks
    if device == "gpu" and not gpus:
        raise ValueError("device gpu: the Ray cluster has no GPUs; use auto or cpu")
    device = "gpu" if device in ("auto", "gpu") and gpus else "cpu"
    if device == "gpu":
        n_actors, threads, resources = max(1, min(actors or int(gpus), len(todo))), 1, {"num_gpus": 1}
    else:
        n_actors = max(1, min(actors or int(cpus), len(todo)))
        threads, resources = max(1, int(cpus) // n_actors), {"num_cpus": 0.5}
    t0, searched, nodes, actor_s = time.perf_counter(), 0, 0, 0.0
    if todo:
        pool, nodes = spread_actor_pool(NeighbourActor, n_actors, resources, db, threads, device, include_increments)
        rows = {f: pq.ParquetFile(f).metadata.num_rows for f in todo}
        log.info("neighbours: %d shards (%d chunks) on %d actors (%s)", len(todo), sum(rows.values()), n_actors, device)
        with tqdm(total=sum(rows.values()), unit="chunk", desc="neighbours", mininterval=2) as bar:
            for _, n, _, shard_s in pool.map_unordered(
                lambda a, f: a.write_shard.remote(f, outs[f], asdict(config)), todo
            ):
                bar.update(n)
                searched += n
                actor_s += shard_s
    seconds = time.perf_counter() - t0
    shards, counts = [], {"chunks": 0, "full": 0}
    for f in files:
        table = pq.read_table(outs[f], columns=["neighbour_ids"])
        ids = np.array(table["neighbour_ids"].to_pylist(), dtype=np.int64).reshape(table.num_rows, -1)
        split = layout.split_of(f)
        full = int((ids >= 0).all(axis=1).sum()) if ids.size else 0
        counts["chunks"] += table.num_rows
        counts["full"] += full
        counts.setdefault("by_split", {}).setdefault(
            split, {"chunks": 0, "full": 0, "k": ids.shape[1] if ids.ndim == 2 else 0}
        )
        counts["by_split"][split]["chunks"] += table.num_rows
        counts["by_split"][split]["full"] += full
        shards.append(stage.shard(outs[f], rows=table.num_rows))
    counts["coverage"] = round(counts["full"] / counts["chunks"], 4) if counts["chunks"] else 0.0
    return stage.complete(
        shards=shards,
        counts=counts,
        queries_per_s_this_run=round(searched / seconds, 1) if searched else None,
        ray_nodes_this_run=nodes,
        search_device=device,
        # summed over actors, without their start-up: the per-query cost a cluster scales
        actor_seconds_this_run=round(actor_s, 2),
        versions=mf.package_versions("faiss-cpu", "ray", "pyarrow"),
    )


def refresh_neighbours(db: str) -> dict:
    """Replaces deleted neighbours in the tables by the next candidates (k kept), searching only the
    rows that hold one, the way the stage searched them (same depth, nprobe and index shards, the
    deleted ids excluded inside faiss); each shard is rewritten atomically. Returns counts."""
    record = completed(db, "neighbours")
    config = config_of(NeighbourConfig, record)
    deleted = deleted_chunk_ids(db)
    index = RetrievalIndex(db, shard_paths=neighbour_index_shards(db, "increment_index_shards" in record["config"]))
    store = TokenStore(db)
    rows_done, rewritten = 0, {}
    for f in tqdm(
        layout.chunk_shard_files(db, layout.SEQUENCE_SPLITS) if len(deleted) else [],
        unit="shard",
        desc="refresh neighbours",
        mininterval=2,
    ):
        out = layout.aligned_path(f, layout.NEIGHBOURS)
        table = pq.read_table(out)
        k = len(table["neighbour_ids"][0]) if table.num_rows else 0
        if not k:
            continue
        ids = table["neighbour_ids"].combine_chunks().values.to_numpy().reshape(-1, k).copy()
        dists = table["distances"].combine_chunks().values.to_numpy().reshape(-1, k).copy()
        stale = np.flatnonzero(np.isin(ids, deleted).any(axis=1))
        if not len(stale):
            continue
        queries = np.asarray(
            load_embedding_rows(db, layout.split_of(f)).get(table["chunk_id"].to_numpy()[stale]), dtype=np.float32
        )
        ids[stale], dists[stale] = neighbours_of(
            index,
            queries,
            store.doc_of(table["chunk_id"].to_numpy()[stale]),
            store.doc_of,
            k=k,
            candidates=config.candidates,
            max_candidates=config.max_candidates,
            nprobe=config.nprobe or None,
        )
        write_neighbour_shard(out, table["chunk_id"], ids, dists)
        rows_done += len(stale)
        rewritten[os.path.relpath(out, db)] = sha256_file(out)
    counts = {"rows_refreshed": rows_done, "shards_rewritten": len(rewritten), "deleted_chunks": int(len(deleted))}
    log.info("refresh-neighbours: %d rows held a deleted neighbour and were searched again", rows_done)
    with mf.locked(db):  # the rewritten shards' hashes, so that syncs and checks see the new bytes
        manifest = mf.read_manifest(db)
        stage = manifest["stages"]["neighbours"]
        for shard in stage["shards"]:
            shard["sha256"] = rewritten.get(shard["path"], shard["sha256"])
        stage["refreshed"] = counts
        mf.write_manifest(db, manifest)
    return counts
