#!/usr/bin/env bash
# Decodes vs arriving prompts (#20 item 3): `fornax serve` (packaged SmolLM2 unless MODEL is set)
# once per --prefill-itl-factor (0 = the fixed token budget, the behaviour before), each under the
# same guidellm-like load: concurrency 4, 128 prompt tokens, 32-128 output tokens, so a new prompt
# arrives whenever a stream ends while the three others decode. Also a pure-decode reference:
# 4 streams started together (ITL without prefills). Writes perf/results/prefill_budget/*.json.
# Usage: perf/run_prefill_budget.sh [OUT_DIR]   (env: MODEL, DTYPE, PORT, FACTORS, NUM_PROMPTS)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-perf/results/prefill_budget}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8766}
DTYPE=${DTYPE:-auto}
FACTORS=${FACTORS:-0 1.5 2}
NUM_PROMPTS=${NUM_PROMPTS:-48}
mkdir -p "$OUT"

bench() {  # NAME, then extra bench flags
    local name=$1; shift
    "$PY" -m fornax.perf serve --base-url "http://127.0.0.1:$PORT" --endpoint /v1/completions \
        --tokenizer "${MODEL:-default}" --input-len 128 --num-warmups 2 --seed 1 --disable-tqdm \
        "$@" --output-json "$OUT/$name.json"
}

for F in $FACTORS; do
    "$PY" -m fornax.api.cli serve ${MODEL:-} --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" \
        --max-model-len 1024 --disable-log-requests --prefill-itl-factor "$F" \
        > "$OUT/.serve_$F.log" 2>&1 &
    SERVER=$!
    trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
        kill -0 $SERVER 2>/dev/null || { cat "$OUT/.serve_$F.log"; exit 1; }
        sleep 0.5
    done
    # staggered arrivals: 4 in flight, the next sent as soon as one ends
    bench "staggered_c4_factor$F" --output-len 32:128 --num-prompts "$NUM_PROMPTS" \
        --max-concurrency 4
    # pure decode: 4 streams together, same lengths, so their prompts prefill in one step
    bench "pure_decode_c4_factor$F" --output-len 128 --num-prompts 4 --max-concurrency 4
    kill -TERM $SERVER; wait $SERVER 2>/dev/null || true
    trap - EXIT
done
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("*.json")):
    m = json.loads(path.read_text())["metrics"]
    print(f"{path.stem:32s} out tok/s {m['output_throughput']:7.1f}  TTFT p50/p95/p99 "
          f"{m['median_ttft_ms']:6.0f}/{m['p95_ttft_ms']:6.0f}/{m['p99_ttft_ms']:6.0f} ms  ITL "
          f"p50/p95/p99 {m['median_itl_ms']:5.1f}/{m['p95_itl_ms']:5.1f}/{m['p99_itl_ms']:5.1f} ms")
PY
