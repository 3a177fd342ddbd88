#!/usr/bin/env bash
# Offline throughput vs HF transformers (#20's target: >= 3.5x HF bf16 `generate`), fornax with
# its defaults on the packaged SmolLM2-135M GGUF (dtype auto, weights kept quantized), HF on the
# same file dequantized, same dtype and threads, in one process: 32 seeded prompts of 64-512
# tokens x 64-256 output tokens (greedy, ignore_eos), NUM_ITERS alternating repetitions, medians.
# Usage: perf/run_throughput_hf.sh [OUT_DIR]   (env: OMP_NUM_THREADS, NUM_ITERS, NUM_PROMPTS,
# MODEL, NAME)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-perf/results/throughput_vs_hf}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
ARGS=(--peer hf --num-prompts "${NUM_PROMPTS:-32}" --input-len 64:512 --output-len 64:256
      --max-model-len 1024 --num-iters "${NUM_ITERS:-2}" --disable-tqdm)
[ -n "${MODEL:-}" ] && ARGS+=(--model "$MODEL")
"$PY" -m fornax.perf throughput "${ARGS[@]}" \
    --output-json "$OUT/${NAME:-smollm2_q4_1_auto}_${OMP_NUM_THREADS}threads.json"
