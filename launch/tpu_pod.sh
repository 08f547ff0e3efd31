#!/usr/bin/env bash
# Run a forgetjax study on every worker of a TPU pod: bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG [overrides...]
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?study config}; shift 3
REPO_DIR=${REPO_DIR:-'~/forgetjax'}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && bash tools/setup.sh && .venv/bin/pip install -q -e '.[tpu]' && \
   .venv/bin/forgetjax study $CONFIG $* --executor local --distributed"
