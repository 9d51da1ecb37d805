"""Generation tokens/s and explanation latency through the service, side by side in one run with the
same calls in one process.

    python -m bench.generation --db db --run runs/default [--prompts 8] [--new-tokens 64] [--out FILE]

For a RETRO-fitted run it also times the frozen base's own Hugging Face ``generate`` (greedy, KV cache)
on the same prompts and lengths (``against_base``).

Prompts are the first 100 LM tokens (a chunk and a half) of held-out valid/test documents; the
explained texts are their first 256 tokens (the tiny model's context). Greedy, k from the checkpoint.

- in process: ``model.generate.generate`` with a ``LocalRetriever`` (the DB's BERT and index in this
  process, all cores to torch); ``LocalRetriever`` per chunk + ``model.explain.token_logprobs``.
- service: ``POST /v1/generate`` and ``POST /v1/explain`` on ``make serve RUN=...``'s application
  (default ``ServiceConfig``), one client, then 4 concurrent clients (aggregate tokens/s).
The service's answers are checked against the in-process ones (the same text for every prompt).
"""

import argparse
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
import torch
from ray import serve

from index_service.app import ServiceConfig, build_app
from model import checkpoint
from model.explain import conditioning_chunks, token_logprobs
from model.generate import chunk_tokens, generate
from model.retrieval import LocalRetriever
from retro_db.layout import document_shard_files, split_of
from retro_db.ray_cluster import connect_ray
from retro_db.token_store import TokenStore
from retro_db.tokenizer import EOS, db_tokenizer, special_id

log = logging.getLogger("bench.generation")


def held_out_tokens(db: str, n: int, length: int) -> list[list[int]]:
    """The first ``length`` LM tokens of ``n`` valid/test documents that have as many."""
    import pyarrow.parquet as pq

    store, out = TokenStore(db), []
    for path in document_shard_files(db):
        if split_of(path) not in ("valid", "test"):
            continue
        table = pq.read_table(path, columns=["first_chunk_id", "n_tokens"]).to_pylist()
        for doc in table:
            if doc["n_tokens"] >= length:
                n_chunks = -(-length // store.chunk_size)
                tokens, lengths = store.chunks(np.arange(doc["first_chunk_id"], doc["first_chunk_id"] + n_chunks))
                out.append(np.concatenate([t[:m] for t, m in zip(tokens, lengths)])[:length].tolist())
                if len(out) == n:
                    return out
    return out


def against_base(model, tokenizer, prompts: list[str], retriever, new_tokens: int) -> dict | None:
    """A RETRO-fit against its frozen base's own Hugging Face ``generate`` (greedy, its KV cache): the same
    prompts, exactly ``new_tokens`` each (no stop token), one process. None for a model without a base."""
    if not model.config.base:
        return None
    ids = [tokenizer.encode(p).ids for p in prompts]
    t0 = time.perf_counter()
    for x in ids:
        generate(model, x, retriever, max_new_tokens=new_tokens)
    retrofit = len(ids) * new_tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for x in ids:
        idx = torch.tensor([x])
        model.base.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    base = len(ids) * new_tokens / (time.perf_counter() - t0)
    return {"retrofit_tokens_per_s": retrofit, "base_generate_tokens_per_s": base, "ratio": retrofit / base}


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="db")
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--service", default="{}", help="ServiceConfig fields as JSON, e.g. '{\"model_threads\": 2}'")
    parser.add_argument("--out", default="bench/out/generation.json")
    args = parser.parse_args()

    tokenizer = db_tokenizer(args.db)
    model, ckpt = checkpoint.load(checkpoint.resolve(args.run))
    model.eval()
    k = checkpoint.trained_k(ckpt)
    retriever, stop = LocalRetriever(args.db, k=k, align=model.config.align_neighbours), special_id(tokenizer, EOS)
    prompts = [tokenizer.decode(t) for t in held_out_tokens(args.db, args.prompts, 100)]
    explained = [
        tokenizer.decode(t)
        for t in held_out_tokens(args.db, args.prompts, model.config.max_chunks * model.config.chunk_size)
    ]
    m = model.config.chunk_size

    # in process
    local_texts, t0, generated = [], time.perf_counter(), 0
    for prompt in prompts:
        ids = tokenizer.encode(prompt).ids
        tokens, _ = generate(model, ids, retriever, max_new_tokens=args.new_tokens, stop_id=stop)
        generated += len(tokens) - len(ids)
        local_texts.append(tokenizer.decode(tokens[len(ids) :]))
    local_gen = {"tokens_per_s": generated / (time.perf_counter() - t0), "tokens": generated}
    base_gen = against_base(model, tokenizer, prompts, retriever, args.new_tokens)
    local_explain = []
    for text in explained:
        t = time.perf_counter()
        ids = tokenizer.encode(text).ids
        rows = {u: retriever(chunk_tokens(ids, u, m)).rows for u in conditioning_chunks(len(ids), m)}
        token_logprobs(model, ids, rows)
        local_explain.append(time.perf_counter() - t)

    # through the service
    connect_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(
        build_app(ServiceConfig(**{"db": args.db, "run": args.run, **json.loads(args.service)})),
        name="bench-generation",
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{args.port}"
    session = requests.Session()

    def generate_remote(prompt: str) -> dict:
        return session.post(
            url + "/v1/generate", json={"prompt": prompt, "max_new_tokens": args.new_tokens}, timeout=600
        ).json()

    generate_remote(prompts[0])  # warm-up: the first call loads BERT's and torch's kernels
    t0 = time.perf_counter()
    answers = [generate_remote(p) for p in prompts]
    service_gen = {
        "tokens_per_s": sum(a["generated_tokens"] for a in answers) / (time.perf_counter() - t0),
        "tokens": sum(a["generated_tokens"] for a in answers),
    }
    identical = [a["text"] for a in answers] == local_texts
    with ThreadPoolExecutor(4) as pool:
        t0 = time.perf_counter()
        concurrent = list(
            pool.map(
                lambda p: requests.post(
                    url + "/v1/generate", json={"prompt": p, "max_new_tokens": args.new_tokens}, timeout=600
                ).json(),
                prompts,
            )
        )
        service_gen_4 = {"tokens_per_s": sum(a["generated_tokens"] for a in concurrent) / (time.perf_counter() - t0)}
    service_explain = []
    for text in explained:
        t = time.perf_counter()
        session.post(url + "/v1/explain", json={"text": text}, timeout=600).raise_for_status()
        service_explain.append(time.perf_counter() - t)
    serve.shutdown()

    result = {
        "machine": f"{os.cpu_count()} CPUs",
        "checkpoint": checkpoint.resolve(args.run),
        "service": json.loads(args.service),
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "k": k,
        "identical_text": identical,
        "generate": {
            "in_process": local_gen,
            "service": service_gen,
            "service_4_clients": service_gen_4,
            "ratio": service_gen["tokens_per_s"] / local_gen["tokens_per_s"],
            "against_base": base_gen,
        },
        "explain": {
            "in_process_p50_ms": percentile_ms(local_explain, 50),
            "service_p50_ms": percentile_ms(service_explain, 50),
            "in_process_p90_ms": percentile_ms(local_explain, 90),
            "service_p90_ms": percentile_ms(service_explain, 90),
            "ratio_p50": float(np.median(service_explain) / np.median(local_explain)),
        },
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    g, e = result["generate"], result["explain"]
    print(
        f"generation, {len(prompts)} prompts x {args.new_tokens} tokens (greedy, k={k}); same text in both: {identical}"
    )
    print("| | in process | service, 1 client | service / in process | service, 4 clients |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| tokens/s | {g['in_process']['tokens_per_s']:.1f} | {g['service']['tokens_per_s']:.1f} | {g['ratio']:.2f} | "
        f"{g['service_4_clients']['tokens_per_s']:.1f} |"
    )
    print(
        f"| explain {model.config.max_chunks * m} tokens, p50 ms (p90) | "
        f"{e['in_process_p50_ms']} ({e['in_process_p90_ms']}) | "
        f"{e['service_p50_ms']} ({e['service_p90_ms']}) | {e['ratio_p50']:.2f} | |"
    )
    if base_gen:
        print(
            f"RETRO-fit with retrieval {base_gen['retrofit_tokens_per_s']:.1f} tokens/s, its base's own generate "
            f"{base_gen['base_generate_tokens_per_s']:.1f} tokens/s: {base_gen['ratio']:.2f}"
        )


if __name__ == "__main__":
    main()
