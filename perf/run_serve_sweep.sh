#!/usr/bin/env bash
# Serving sweep behind the README's serving table: start `fornax serve` (packaged SmolLM2 unless
# MODEL is set), run `fornax bench serve` at concurrency 1, 8 and 32, write perf/results/*.json.
# Usage: perf/run_serve_sweep.sh [OUT_DIR]   (env: MODEL, DTYPE, PORT, INPUT_LEN, OUTPUT_LEN)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-perf/results}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8765}
DTYPE=${DTYPE:-bfloat16}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
mkdir -p "$OUT"

"$PY" -m fornax.api.cli serve ${MODEL:-} --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" \
    --max-model-len 1024 --disable-log-requests > "$OUT/.serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    kill -0 $SERVER 2>/dev/null || { cat "$OUT/.serve.log"; exit 1; }
    sleep 0.5
done

for C in 1 8 32; do
    N=$(( C == 1 ? 8 : 2 * C ))
    "$PY" -m fornax.perf serve --base-url "http://127.0.0.1:$PORT" --endpoint /v1/completions \
        --tokenizer "${MODEL:-default}" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --num-prompts "$N" --max-concurrency "$C" --num-warmups 2 --seed "$C" \
        --goodput ttft:2000 tpot:500 --disable-tqdm \
        --output-json "$OUT/serve_smollm2_${DTYPE}_c${C}.json"
done
