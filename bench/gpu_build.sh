#!/usr/bin/env bash
# The GPU machine's end-to-end check: the suite, then `build-db` of >= 20M tokens with Beam on every
# core, a BERT on the GPU, faiss's GPU build training the index and searching the neighbours.
#
#   bench/gpu_build.sh [OUT]     # on a GPU node with the project's venv (`make venv`) plus faiss-gpu
#
# Needs: CUDA torch and faiss's GPU build in .venv (faiss-gpu-cu12 needs CUDA 12's cuBLAS), the large
# corpus (`make corpus-large`, or its file copied here), and a BERT directory in $BERT (default: a
# bert-base-uncased layout with random weights, made here from its config: throughput does not depend on
# weight values, retrieval quality does, so no quality figure comes from it). Writes OUT/log and
# OUT/manifest.json; every figure it prints names the device.
set -euo pipefail
OUT=${1:-bench/out/gpu-build}
PY=${PY:-.venv/bin/python}
CORPUS=${CORPUS:-bench/out/large/corpus.jsonl.zst}
FRACTION=${FRACTION:-0.15}  # every 7th record of the ~148M-token corpus: ~21M tokens
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import faiss, torch; print('faiss GPUs', faiss.get_num_gpus(), 'torch', torch.__version__, torch.cuda.get_device_name(0))"

# 1. The suite: the device tests run their GPU paths here (faiss-gpu index and search, neighbours,
#    CUDA embedding, bf16 training), each against the CPU's answer.
$PY -m pytest -q -ra tests/test_devices.py
$PY -m pytest -q -ra tests

# 2. A BERT-base layout with random weights, unless $BERT names a real one.
if [ -z "${BERT:-}" ]; then
  BERT="$OUT/bert-base-random"
  $PY - "$BERT" <<'EOF'
import sys
from transformers import BertConfig, BertModel
from retro_db.embedder import resolve_model
import shutil, os
config = BertConfig()  # bert-base: 12 layers, 768 wide, 30,522 wordpieces
BertModel(config).save_pretrained(sys.argv[1])
src = resolve_model("default")  # the packaged MiniLM's uncased wordpiece vocabulary is bert-base-uncased's
for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), os.path.join(sys.argv[1], name))
EOF
fi

# 3. build-db: Beam's local runner on every core, embedding on the GPU (tokenization on the actor's CPU
#    threads), faiss on the GPU.
$PY - "$CORPUS" "$FRACTION" "$OUT/corpus.jsonl.zst" <<'EOF'
import sys
from bench.chunk_scale import corpus_lines, write_fraction
write_fraction(corpus_lines(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
EOF
rm -rf "$OUT/db"
/usr/bin/time -v $PY -m pipeline build-db --corpus "$OUT/corpus.jsonl.zst" --db "$OUT/db" \
  --tokenizer db/tokenizer.json --model "$BERT" --device gpu \
  --runner=FnApiRunner --direct_running_mode=multi_processing --direct_num_workers="$(nproc)" \
  --num-shards=16
cp "$OUT/db/manifest.json" "$OUT/manifest.json"
$PY - "$OUT/db" <<'EOF'
import json, sys
stages = json.load(open(f"{sys.argv[1]}/manifest.json"))["stages"]
c, e, i, n = (stages[s] for s in ("chunks", "embeddings", "index", "neighbours"))
print("tokens", c["counts"]["tokens"], "chunks", c["counts"]["chunks"])
print("embeddings: chunks/s", e["counts"]["chunks_per_s_this_run"])
print("index:", i["config"]["factory"], "train s", i.get("train_seconds"), i.get("train_device"), "add s", i["add_seconds"],
      "recall@10", i["recall_at_10"], "nprobe", i["default_nprobe"])
print("neighbours: q/s", n["queries_per_s_this_run"], "device", n["search_device"])
EOF
