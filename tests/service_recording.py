"""A fixed set of requests to the index service and their exact response bodies.

Recorded against a service (with a model) before a change to the service and compared byte for
byte after it: the change must not alter what a client sees. Only what differs from run to run
by design is masked: audit timestamps, the checkpoint's absolute path and, given ``roots``, the
temporary directory the DB's corpus was read from. Across machines, CPUs of other vector units (AVX2,
AVX-512) round BERT, training and faiss differently: ``--float-tolerance`` then compares everything
but floats exactly and floats to a relative tolerance.

    python tests/service_recording.py --url http://127.0.0.1:8000 --db db --token $RETRO_ADMIN_TOKEN --out before.json
    python tests/service_recording.py ... --out after.json --compare before.json

``test_index_service`` replays it against its test service and compares with
``tests/data/service_recording.json`` (recorded from the test fixtures, which are deterministic).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np
import pyarrow.parquet as pq
import requests

MASKS = (
    (re.compile(rb'"time":"[^"]*"'), b'"time":"<time>"'),
    (re.compile(rb'"checkpoint":"[^"]*"'), b'"checkpoint":"<checkpoint>"'),
)
PROMPT = "The list data type has some more methods. Here are all of the methods of list objects:"
EXPLAIN = (
    "A dictionary maps keys to values. Keys must be hashable; lists cannot be keys because they are mutable. "
    "The dict constructor builds dictionaries directly from sequences of key-value pairs, and dict comprehensions "
    "create dictionaries from arbitrary key and value expressions. When the keys are simple strings, it is sometimes "
    "easier to specify pairs using keyword arguments."
)


def db_samples(db: str) -> tuple[list[list[float]], list[list[int]], list[int], int]:
    """Query embeddings, token queries, chunk ids and a document id read from the DB's own files."""
    (emb_file,) = sorted(f for f in os.listdir(os.path.join(db, "embeddings", "valid")) if f.endswith(".npy"))[:1]
    vectors = np.load(os.path.join(db, "embeddings", "valid", emb_file))[:3].astype(np.float32)
    shard = sorted(f for f in os.listdir(os.path.join(db, "chunks", "valid")) if f.endswith(".parquet"))[0]
    valid = pq.read_table(os.path.join(db, "chunks", "valid", shard)).to_pylist()
    train_shard = sorted(f for f in os.listdir(os.path.join(db, "chunks", "train")) if f.endswith(".parquet"))[0]
    train = pq.read_table(os.path.join(db, "chunks", "train", train_shard), columns=["chunk_id", "doc_id"]).to_pylist()
    tokens = [list(map(int, r["tokens"])) for r in valid[:2]]
    return vectors.tolist(), tokens, [train[0]["chunk_id"], train[5]["chunk_id"]], train[5]["doc_id"]


def requests_for(db: str) -> list[tuple[str, str, str, dict | None, bool]]:
    """(name, method, path, JSON body, with the admin token) in the order they are sent."""
    embeddings, tokens, chunk_ids, doc = db_samples(db)
    reason = {"reason": "recording"}
    return [
        ("info", "GET", "/v1/info", None, False),
        ("openapi", "GET", "/openapi.json", None, False),
        (
            "search_texts",
            "POST",
            "/v1/search",
            {"texts": ["How do I sort a dict by value?", "asyncio event loop"], "k": 3},
            False,
        ),
        ("search_tokens", "POST", "/v1/search", {"token_ids": tokens, "k": 2, "return_tokens": True}, False),
        (
            "search_tokens_aligned",
            "POST",
            "/v1/search",
            {"token_ids": tokens, "k": 2, "align": True, "return_tokens": True},
            False,
        ),
        ("search_embeddings", "POST", "/v1/search", {"embeddings": embeddings, "k": 4, "nprobe": 2}, False),
        ("search_bad", "POST", "/v1/search", {"texts": [], "k": 0}, False),
        ("chunk", "GET", f"/v1/chunks/{chunk_ids[0]}", None, False),
        ("chunk_missing", "GET", "/v1/chunks/999999999", None, False),
        ("generate_greedy", "POST", "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 80}, False),
        (
            "generate_sampled",
            "POST",
            "/v1/generate",
            {"prompt": PROMPT, "max_new_tokens": 70, "temperature": 0.9, "top_k": 40, "seed": 7, "explain": True},
            False,
        ),
        (
            "generate_no_retrieval",
            "POST",
            "/v1/generate",
            {"prompt": PROMPT, "max_new_tokens": 40, "retrieval": False, "k": 3},
            False,
        ),
        ("explain", "POST", "/v1/explain", {"text": EXPLAIN}, False),
        ("explain_k", "POST", "/v1/explain", {"text": EXPLAIN, "k": 4}, False),
        ("generate_bad", "POST", "/v1/generate", {"prompt": "", "max_new_tokens": 0}, False),
        ("delete_without_token", "POST", "/v1/documents/delete", {"doc_ids": [doc], **reason}, False),
        ("delete", "POST", "/v1/documents/delete", {"doc_ids": [doc], **reason}, True),
        ("chunk_deleted", "GET", f"/v1/chunks/{chunk_ids[1]}", None, False),
        ("deletions", "GET", "/v1/deletions", None, False),
        ("restore", "POST", "/v1/documents/restore", {"doc_ids": [doc], **reason}, True),
        ("restore_again", "POST", "/v1/documents/restore", {"doc_ids": [doc], **reason}, True),
        ("deletions_after", "GET", "/v1/deletions?since=0&limit=10", None, False),
        ("chunk_restored", "GET", f"/v1/chunks/{chunk_ids[1]}", None, False),
    ]


def masked(body: bytes, roots: tuple[str, ...] = ()) -> str:
    for pattern, replacement in MASKS:
        body = pattern.sub(replacement, body)
    for root in roots:  # where the DB's corpus files were: a temporary directory of the run
        body = body.replace(root.encode(), b"<root>")
    return body.decode("utf-8")


def record(url: str, db: str, token: str, roots: tuple[str, ...] = ()) -> dict[str, dict]:
    """{name: {"status", "body"}} of every request, in order (the DB is as before at the end).
    ``roots``: directories masked as ``<root>`` in the bodies (documents' source paths)."""
    out, session = {}, requests.Session()
    for name, method, path, body, admin in requests_for(db):
        headers = {"Authorization": f"Bearer {token}"} if admin else {}
        response = session.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=300)
        out[name] = {"status": response.status_code, "body": masked(response.content, roots)}
    return out


def _close(before, after, rel: float) -> bool:
    """The same JSON value, floats within ``rel`` of the recorded ones (everything else exactly)."""
    if isinstance(before, float) and isinstance(after, float):
        return abs(after - before) <= rel * max(abs(before), 1e-6)
    if type(before) is not type(after):
        return False
    if isinstance(before, dict):
        return before.keys() == after.keys() and all(_close(before[k], after[k], rel) for k in before)
    if isinstance(before, list):
        return len(before) == len(after) and all(_close(b, a, rel) for b, a in zip(before, after))
    return before == after


def _same(before: dict | None, after: dict | None, rel: float) -> bool:
    if before == after:
        return True
    if not rel or before is None or after is None or before["status"] != after["status"]:
        return False
    try:
        return _close(json.loads(before["body"]), json.loads(after["body"]), rel)
    except ValueError:  # not JSON: bytes only
        return False


def differences(before: dict, after: dict, float_tolerance: float = 0.0) -> list[str]:
    """The names of the requests whose status or body changed (or that are missing on one side): byte for
    byte, or with ``float_tolerance`` > 0 every float within that relative tolerance of the recorded one."""
    names = dict.fromkeys([*before, *after])
    return [name for name in names if not _same(before.get(name), after.get(name), float_tolerance)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument(
        "--db", required=True, help="the DB the service serves (read for query embeddings, tokens and ids)"
    )
    parser.add_argument("--token", default=os.environ.get("RETRO_ADMIN_TOKEN", ""), help="the service's admin token")
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", help="a recording to compare with: exit 1 naming each request that differs")
    parser.add_argument(
        "--float-tolerance",
        type=float,
        default=0.0,
        help="relative tolerance for floats in the bodies (0: byte for byte; for a recording made on another CPU)",
    )
    args = parser.parse_args()
    recording = record(args.url, args.db, args.token)
    with open(args.out, "w") as f:
        json.dump(recording, f, indent=1, ensure_ascii=False)
    print(f"{len(recording)} requests recorded in {args.out}")
    if args.compare:
        changed = differences(json.load(open(args.compare)), recording, args.float_tolerance)
        print(f"identical to {args.compare}" if not changed else f"differ from {args.compare}: {changed}")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
