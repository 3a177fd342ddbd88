#!/usr/bin/env bash
# One-shot GPU check of fornax on the device machine (see perf/README.md, "GPU runbook").
# Carry .whl (made by perf/gpu_prepare_carry.sh) and run from the repo root:
#   bash perf/gpu_runbook.sh tests     # pytest -m gpu (FlashInfer vs torch_ref, graphs, HF parity)
#   bash perf/gpu_runbook.sh floor     # bench decode-floor: Llama-3.1-8B shape, batch 1/64/256
#   bash perf/gpu_runbook.sh modes     # bench modes: nano-vllm workload, eager/compiled/graphs/HF
#   bash perf/gpu_runbook.sh tests floor   # several stages in one call
# Each stage has its own time limit (TESTS_TIMEOUT, FLOOR_TIMEOUT, MODES_TIMEOUT seconds); keep
# their sum under the device call's 600 s when several stages share one call.
# Every stage writes its log (and JSON) into $OUT (or ./gpu-out when OUT is unset); a failing
# stage does not stop the next one. Installs only under /tmp (never into $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} HF_HUB_OFFLINE=1
export FORNAX_CACHE=${FORNAX_CACHE:-/tmp/fornax-cache} MAX_JOBS=${MAX_JOBS:-16}
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/flashinfer-ws}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}

install() {
    [ -f "$SITE/.fornax-ready" ] && return 0
    mkdir -p "$SITE"
    if ls .whl/flashinfer-*.tar.xz >/dev/null 2>&1; then
        "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
            .whl/flashinfer-*.tar.xz "$SITE"
    fi
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl
    fi
    # fornax itself, no dependencies (the image has torch, transformers, tokenizers, ...)
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target "$SITE" . || return 1
    touch "$SITE/.fornax-ready"
}

report_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
for name in ("flashinfer", "tvm_ffi", "msgspec", "transformers", "triton"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING", type(exc).__name__, exc)
import fornax.runtime.offline.llm  # the offline engine path imports with what is here
print("fornax offline engine imports")
EOF
}

stage_tests() {
    timeout "${TESTS_TIMEOUT:-540}" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/gpu/test_gpu_*.py \
        --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
}

stage_floor() {
    timeout "${FLOOR_TIMEOUT:-560}" "$PY" -m fornax.perf decode-floor --shape llama-3.1-8b --batch-sizes 1,64,256 \
        --context-len 1024 --decode-steps 32 --output-json "$OUT/decode_floor_llama8b.json" \
        2>&1 | tee "$OUT/decode-floor.log"
}

stage_modes() {
    timeout "${MODES_TIMEOUT:-580}" "$PY" -m fornax.perf modes --shape qwen3-0.6b --num-prompts 256 \
        --input-len 100:1024 --output-len 100:1024 --modes eager,compiled,graphs --peer hf \
        --hf-batch-size 64 --output-json "$OUT/modes_qwen3_0.6b.json" 2>&1 | tee "$OUT/modes.log"
}

export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
{ install && report_env; } 2>&1 | tee "$OUT/env.log"
status=0
for stage in "${@:-tests}"; do
    echo "=== stage $stage ($(date -u +%H:%M:%S))"
    "stage_$stage" || status=1
done
exit $status
