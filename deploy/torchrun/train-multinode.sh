#!/usr/bin/env bash
# RETRO training on N nodes x G GPUs with torchrun (DDP, NCCL, bf16 autocast), from a DB that every
# node mounts at $DB. Run the same command on every node; NODE_RANK differs.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 deploy/torchrun/train-multinode.sh
set -euo pipefail
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:?set NODE_RANK (0 on the master)}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}
GPUS=${GPUS:-8}
DB=${DB:-/mnt/db}
OUT=${OUT:-/mnt/runs/retro-172m}

torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
  --master_addr "$MASTER_ADDR" --master_port 29500 \
  -m model.train --db "$DB" --out "$OUT" --config paper-172m --batch-size 16 --steps 100000
