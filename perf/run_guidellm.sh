#!/usr/bin/env bash
# guidellm (the load generator vLLM users run in perf CI) against `fornax serve` and llama.cpp's
# llama-server, one at a time, on the same GGUF and threads (issue #20's third-party check):
# concurrency 4, synthetic prompts of 128 tokens, 32 output tokens (ignore_eos), /v1/completions,
# 4 warm-up + 64 measured requests per server, prefix/prompt caching off on both sides.
# guidellm lives in its own venv under the fornax cache (its pins would downgrade click and
# multidict in .venv); this script creates it once. JSON into perf/results/guidellm/.
# Usage: perf/run_guidellm.sh [OUT_DIR]   (env: MODEL, NAME, SERVE_ARGS, OMP_NUM_THREADS,
# CONCURRENCY, MAX_REQUESTS; more flags: python -m fornax.perf.guidellm_peer --help)
# Needs `python -m tools.build_llama_server` once (several minutes; run here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-perf/results/guidellm}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
GUIDELLM_VERSION=$("$PY" -c 'from fornax.perf.guidellm_peer import GUIDELLM_VERSION as v; print(v)')
VENV=$("$PY" -c 'from fornax.perf.guidellm_peer import default_guidellm as d; print(d().parent.parent)')
if ! "$VENV/bin/guidellm" --version 2>/dev/null | grep -q "$GUIDELLM_VERSION"; then
    "$(readlink -f "$PY")" -m venv "$VENV"
    # the constraints keep the CPU build of torch (guidellm requires torch)
    "$VENV/bin/pip" install -q -c constraints.txt "guidellm==$GUIDELLM_VERSION"
fi
"$PY" -m tools.build_llama_server  # returns at once once built

ARGS=(--output-dir "$OUT" --name "${NAME:-smollm2_q4_1}" --concurrency "${CONCURRENCY:-4}"
      --max-requests "${MAX_REQUESTS:-64}" "--serve-args=${SERVE_ARGS:---max-model-len 2048}")
[ -n "${MODEL:-}" ] && ARGS+=(--model-path "$MODEL")
"$PY" -m fornax.perf.guidellm_peer "${ARGS[@]}"
