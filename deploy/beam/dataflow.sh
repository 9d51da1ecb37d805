#!/usr/bin/env bash
# The chunk stage (Beam) on Google Cloud Dataflow, workers from the project image (deploy/Dockerfile).
# Then the Ray stages on a Ray cluster: deploy/kuberay/rayjob-build-db.yaml or RAY_ADDRESS=... make build-db.
set -euo pipefail
PROJECT=${PROJECT:?set PROJECT}
REGION=${REGION:-us-central1}
BUCKET=${BUCKET:?set BUCKET}
IMAGE=${IMAGE:-us-docker.pkg.dev/$PROJECT/retro/retro-db:0.1.0-cpu}

python -m pipeline chunks \
  --corpus "gs://$BUCKET/pile/*.jsonl.zst" --db "gs://$BUCKET/db" --num-shards 4096 \
  --runner=DataflowRunner --project="$PROJECT" --region="$REGION" \
  --temp_location="gs://$BUCKET/tmp" --staging_location="gs://$BUCKET/staging" \
  --sdk_container_image="$IMAGE" --sdk_location=container \
  --experiments=use_runner_v2 --max_num_workers=500 --autoscaling_algorithm=THROUGHPUT_BASED
