#!/usr/bin/env bash
# The accelerator table in the README, in one prepared run: correctness checks first, then forgetjax vs HF at
# Qwen2.5 shapes with random weights (bf16 compute; train steps keep float32 master weights), then a 7B
# full-parameter SFT step on one device with remat and bf16 Adam moments beside its `forgetjax plan` estimate
# (where the plan says it exceeds the device, an 80 GB H100, the step prints that and is not run).
# PART=3 times decode alone (XLA and ragged Pallas decode attention) and prints where its device time went
# (benchmarks/trace_summary.py).
# Usage: [PART=1|2|3|all] bash benchmarks/accelerator_suite.sh [LOG]   (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-runs/accelerator_suite.log}
mkdir -p "$(dirname "$LOG")"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
WORK=${WORK_DIR:-/tmp/forgetjax-bench}
step() {
  local limit=$1; shift
  echo "=== $(date +%T) $*" | tee -a "$LOG"
  timeout "$limit" "$PY" "$@" --work-dir "$WORK" 2>&1 | grep -v -e "Loading weights" -e "^W0000\|^I0000" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$LOG"
"$PY" -c "import jax, flax, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())" 2>&1 | tee -a "$LOG"
PART=${PART:-all}
if [ "$PART" = all ] || [ "$PART" = 1 ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false step 150 benchmarks/check_accelerator.py --model qwen2.5-0.5b
  step 110 benchmarks/forward.py --model qwen2.5-1.5b --dtype bfloat16 --batch 8 --seq 2048 --rounds 1 --repeats 3
  step 130 benchmarks/train_step.py --model qwen2.5-0.5b --dtype bfloat16 --batch 4 --seq 2048 --rounds 1 \
    --repeats 3 --synthetic --remat "${REMAT_05B:-none}"
  step 175 benchmarks/sampler.py --model qwen2.5-1.5b --dtype bfloat16 --prompt-tokens 128 --new-tokens 256 \
    --batch-sizes 1 32 256 --rounds 1 --repeats 1 --decode-unroll 4 --decode-attention xla ragged
fi
if [ "$PART" = all ] || [ "$PART" = 2 ]; then
  step 150 benchmarks/train_step.py --model qwen2.5-7b --dtype bfloat16 --batch 4 --seq 2048 --rounds 1 --repeats 2 \
    --synthetic --remat full --moments-dtype bfloat16 --skip-torch
  step 90 benchmarks/forward.py --model qwen2.5-0.5b --dtype bfloat16 --batch 8 --seq 2048 --rounds 1 --repeats 3
  step 130 benchmarks/train_step.py --model qwen2.5-1.5b --dtype bfloat16 --batch 4 --seq 2048 --rounds 1 \
    --repeats 3 --synthetic --remat "${REMAT_15B:-none}"
fi
if [ "$PART" = 3 ]; then  # decode only, with a trace of one run per batch size summarised into the log
  step 420 benchmarks/sampler.py --model qwen2.5-1.5b --dtype bfloat16 --prompt-tokens 128 --new-tokens 256 \
    --batch-sizes 1 32 256 --rounds 1 --repeats 1 --decode-unroll 4 --decode-attention xla ragged \
    --profile-dir "$WORK/profiles"
fi
echo "=== $(date +%T) done" | tee -a "$LOG"
