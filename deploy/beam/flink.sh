#!/usr/bin/env bash
# The chunk stage (Beam) on a Flink cluster through Beam's portable runner, SDK workers in the
# project image (deploy/Dockerfile). The corpus and DB live on storage every worker reaches (S3 here).
set -euo pipefail
FLINK_MASTER=${FLINK_MASTER:-flink-jobmanager:8081}
IMAGE=${IMAGE:-retro-db:0.1.0-cpu}

python -m pipeline chunks \
  --corpus "s3://retro-data/pile/*.jsonl.zst" --db "s3://retro-data/db" --num-shards 1024 \
  --runner=FlinkRunner --flink_master="$FLINK_MASTER" --parallelism=256 \
  --environment_type=DOCKER --environment_config="$IMAGE" \
  --s3_region_name=us-east-1
