#!/usr/bin/env bash
# fornax vs llama.cpp's llama-server side by side (issue #20's table): each run launches
# `fornax serve` (prefix caching off), benches it, stops it, then does the same with llama-server
# (same GGUF and threads, -np = concurrency, prompt caching off), over HTTP /v1/completions,
# `ignore_eos`. Three runs: batch-1 decode + TTFT (128-token prompts x 128 tokens, concurrency 1),
# and the held-out workload (32 prompts of 64-512 tokens x 128 tokens) at concurrency 1 and 8.
# Usage: perf/run_llamacpp_peer.sh [OUT_DIR]   (env: MODEL, NAME, SERVE_ARGS, OMP_NUM_THREADS;
# TOKENIZER for prompts of exact lengths, default the packaged SmolLM2 one, which the synthetic
# GGUFs of tools/make_synthetic_gguf.py share)
# Needs `python -m tools.build_llama_server` once (several minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-perf/results/llamacpp_peer}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-}  # a .gguf path; empty: the packaged SmolLM2-135M Q4_1
SERVE_ARGS=${SERVE_ARGS:---max-model-len 2048}
NAME=${NAME:-smollm2_q4_1}
mkdir -p "$OUT"
"$PY" -m tools.build_llama_server  # returns at once once built

COMMON=(--launch --peer llama.cpp "--serve-args=$SERVE_ARGS" --endpoint /v1/completions
        --tokenizer "${TOKENIZER:-default}" --output-len 128 --num-warmups 2 --disable-tqdm)
[ -n "$MODEL" ] && COMMON+=(--model-path "$MODEL")

# batch-1 decode (1000 / median_tpot_ms) and TTFT of a 128-token prompt
"$PY" -m fornax.perf serve "${COMMON[@]}" --input-len 128 --num-prompts 8 \
    --max-concurrency 1 --seed 1 --output-json "$OUT/${NAME}_b1_${OMP_NUM_THREADS}threads.json"
# the held-out workload: 32 prompts of 64-512 tokens, 128 output tokens, concurrency 1 and 8
for C in 1 8; do
    "$PY" -m fornax.perf serve "${COMMON[@]}" --input-len 64:512 --num-prompts 32 \
        --max-concurrency "$C" --seed 20 \
        --output-json "$OUT/${NAME}_workload_c${C}_${OMP_NUM_THREADS}threads.json"
done
