#!/usr/bin/env bash
# Issue 14 section 3 in one device call (about 8 minutes on an H200, under the device tool's 10-minute limit):
#   1. install this checkout (no network: --no-deps --no-build-isolation),
#   2. `kvpress-like bench gpu-decode` (8k and 32k, batch 1 and 16, bf16, sdpa; chunked-prefill peak memory),
#   3. the same with flash_attention_2 at 32k when flash-attn is importable (it is skipped otherwise),
#   4. `kvpress-like bench speed --device cuda --model llama-8b-random` at 8k and 32k (prefill overhead, memory).
# Results land in $OUT (the device tool brings that folder back), logs beside them.
#
#   bash evaluations/gpu_issue14.sh           # on the GPU machine
#   bash evaluations/gpu_issue14.sh --tiny    # the same commands on the CPU with tiny models (a smoke test)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvpress_like_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/run.log"
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo "=== [$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

step "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"

if ! "$PY" -c "import kvpress_like.evaluations.gpu_decode" 2>/dev/null; then
  step "install the checkout"
  timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || step "install failed (see run.log)"
fi
CLI=("$PY" -m kvpress_like.cli)

if [[ $TINY == 1 ]]; then
  step "gpu-decode --tiny"
  timeout 900 "${CLI[@]}" bench gpu-decode --tiny --out "$OUT" >>"$LOG" 2>&1 || step "gpu-decode --tiny failed: $?"
  step "speed --model tiny (CPU)"
  timeout 300 "${CLI[@]}" bench speed --model tiny --device cpu --lengths 128,256 --methods no_press,qfilters \
    --ratio 0.875 --repeats 1 --decode-steps 4 --out "$OUT" >>"$LOG" 2>&1 || step "speed --model tiny failed: $?"
  ls -l "$OUT" | tee -a "$LOG"
  exit 0
fi

step "gpu-decode, sdpa (time budget 240 s)"
timeout 280 "${CLI[@]}" bench gpu-decode --time-budget 240 --out "$OUT" >>"$LOG" 2>&1 || step "gpu-decode sdpa exit $?"

if "$PY" -c "import flash_attn" 2>/dev/null; then
  step "gpu-decode, flash_attention_2, 32k only (time budget 80 s)"
  timeout 110 "${CLI[@]}" bench gpu-decode --attn flash_attention_2 --prompts 32768 --memory-budget 0 \
    --time-budget 80 --out "$OUT" >>"$LOG" 2>&1 || step "gpu-decode flash exit $?"
else
  step "flash-attn is not installed here: flash_attention_2 skipped"
fi

step "speed --device cuda --model llama-8b-random, 8k and 32k"
timeout 150 "${CLI[@]}" bench speed --device cuda --model llama-8b-random --lengths 8192,32768 \
  --methods no_press,qfilters,knorm --ratio 0.875 --repeats 3 --decode-steps 8 --out "$OUT" >>"$LOG" 2>&1 \
  || step "speed exit $?"
ls -l "$OUT" | tee -a "$LOG"
