#!/usr/bin/env bash
# The chunk stage (Beam) on a dask.distributed cluster through Beam's Dask runner: the scheduler of
# deploy/dask/dask-cluster.yaml (or any `dask scheduler` whose workers run the project image). The
# corpus and DB live on storage every worker reaches (S3 here).
set -euo pipefail
SCHEDULER=${SCHEDULER:-tcp://retro-chunks-scheduler:8786}

python -m pipeline chunks \
  --corpus "s3://retro-data/pile/*.jsonl.zst" --db "s3://retro-data/db" --num-shards 1024 \
  --runner=DaskRunner --dask_client_address="$SCHEDULER" \
  --s3_region_name=us-east-1
