#!/usr/bin/env bash
# One-shot GPU check of fornax on the device machine (see perf/README.md, "GPU runbook").
# Carry .whl (made by perf/gpu_prepare_carry.sh) and run from the repo root:
#   bash perf/gpu_runbook.sh            # = first: the whole first check, under 8 minutes bare
#   bash perf/gpu_runbook.sh second     # HF parity tests, bench modes, decode floor at batch 256
#   bash perf/gpu_runbook.sh tests floor   # any stages, in order: tests parity floor floor256 modes
# Stages have their own limits (TESTS_TIMEOUT, PARITY_TIMEOUT, FLOOR_TIMEOUT, MODES_TIMEOUT s)
# and each pytest case one of PER_TEST_TIMEOUT s; a failing stage does not stop the next.
# The carried wheels and the imports are checked first: anything missing stops the run at once
# (exit 3: carry; exit 4: imports or no CUDA device). fornax is reinstalled on every call, so a
# rerun on a warm machine tests this tree, not the last one.
# Logs and JSON go to $OUT (./gpu-out when unset). DRY_RUN=1 checks the carry and the install,
# then prints each stage's command instead of running it (what CI does on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} HF_HUB_OFFLINE=1
export FORNAX_CACHE=${FORNAX_CACHE:-/tmp/fornax-cache} MAX_JOBS=${MAX_JOBS:-16}
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/flashinfer-ws}
PY=${PY:-python3}
WHL=${WHL_DIR:-.whl}
SITE=${SITE:-/tmp/site}          # the carried dependencies (kept while their files are the same)
FORNAX_SITE=${SITE}-fornax       # fornax itself, fresh every call
DRY_RUN=${DRY_RUN:-0}

check_carry() {
    local missing=()
    for pattern in 'flashinfer-*.tar.xz' 'apache_tvm_ffi-*.whl' 'msgspec-*.whl' \
                   'pytest_timeout-*.whl'; do
        compgen -G "$WHL/$pattern" >/dev/null || missing+=("$pattern")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "runbook: $WHL lacks ${missing[*]}: run perf/gpu_prepare_carry.sh here and carry" \
             "$WHL (run's carry: [\".whl\"]); stopping before anything else" >&2
        return 3
    fi
}

install() {
    local stamp digest
    digest=$(cd "$WHL" && ls -l --time-style=+%s -- * | sha256sum | cut -c1-16)
    stamp="$SITE/.carry-$digest"
    if [ ! -f "$stamp" ]; then
        rm -rf "$SITE" && mkdir -p "$SITE"
        "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
            "$WHL"/flashinfer-*.tar.xz "$SITE" || return 3
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHL"/*.whl || return 3
        touch "$stamp"
    fi
    # fornax itself, no dependencies (the image has torch, transformers, tokenizers, ...)
    rm -rf "$FORNAX_SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target "$FORNAX_SITE" . || return 4
}

report_env() {
    command -v nvidia-smi >/dev/null \
        && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" - <<'EOF'
import importlib, os, sys
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
problems = []
for name in ("flashinfer", "tvm_ffi", "msgspec", "transformers", "triton", "pytest_timeout"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING", type(exc).__name__, exc)
        problems.append(name)
import fornax.runtime.offline.llm  # the offline engine path imports with what is here
where = os.path.dirname(os.path.dirname(fornax.runtime.__file__))  # fornax: a namespace package
print("fornax from", where)
if not os.path.realpath(where).startswith(os.path.realpath(os.environ["FORNAX_SITE"])):
    problems.append("fornax (not the copy installed by this call)")
if not torch.cuda.is_available() and os.environ.get("DRY_RUN") != "1":
    problems.append("a CUDA device")
if os.environ.get("DRY_RUN") == "1":  # a CPU machine: only fornax's own install must hold
    problems = [p for p in problems if p.startswith("fornax")]
if problems:
    sys.exit("runbook: stopping, missing: " + ", ".join(problems))
EOF
}

run() {  # run CMD... under a limit, or print it under DRY_RUN
    local limit=$1; shift
    if [ "$DRY_RUN" = 1 ]; then echo "would run (limit ${limit}s): $*"; return 0; fi
    timeout "$limit" "$@"
}

PYTEST=("$PY" -m pytest -m gpu -q -rs -p no:cacheprovider -p pytest_timeout
        --timeout "${PER_TEST_TIMEOUT:-150}")

stage_tests() {  # FlashInfer vs torch_ref, CUDA graph replay vs eager
    run "${TESTS_TIMEOUT:-270}" "${PYTEST[@]}" tests/gpu/test_gpu_attention.py \
        tests/gpu/test_gpu_graphs.py --junitxml="$OUT/gpu-tests.xml" 2>&1 \
        | tee "$OUT/gpu-tests.log"
}

stage_parity() {  # engine vs HF transformers on the GPU
    run "${PARITY_TIMEOUT:-240}" "${PYTEST[@]}" tests/gpu/test_gpu_parity.py \
        --junitxml="$OUT/gpu-parity.xml" 2>&1 | tee "$OUT/gpu-parity.log"
}

floor() {  # floor BATCHES NAME
    run "${FLOOR_TIMEOUT:-150}" "$PY" -m fornax.perf decode-floor --shape llama-3.1-8b \
        --batch-sizes "$1" --context-len 1024 --decode-steps 32 \
        --output-json "$OUT/decode_floor_llama8b_$2.json" 2>&1 | tee "$OUT/decode-floor-$2.log"
}

stage_floor() { floor 1,64 b1_b64; }
stage_floor256() { floor 256 b256; }

stage_modes() {
    run "${MODES_TIMEOUT:-300}" "$PY" -m fornax.perf modes --shape qwen3-0.6b --num-prompts 256 \
        --input-len 100:1024 --output-len 100:1024 --modes eager,compiled,graphs --peer hf \
        --hf-batch-size 64 --output-json "$OUT/modes_qwen3_0.6b.json" 2>&1 | tee "$OUT/modes.log"
}

stages=("${@:-first}")
case "${stages[*]}" in
    first) stages=(tests floor) ;;
    second) stages=(parity modes floor256) ;;
esac
for stage in "${stages[@]}"; do
    declare -F "stage_$stage" >/dev/null || { echo "runbook: unknown stage $stage" >&2; exit 2; }
done

export PYTHONPATH=$FORNAX_SITE:$SITE${PYTHONPATH:+:$PYTHONPATH} FORNAX_SITE DRY_RUN
echo "=== carry and install ($(date -u +%H:%M:%S))"
check_carry || exit 3
{ install || exit $?; report_env || exit 4; } 2>&1 | tee "$OUT/env.log"
code=${PIPESTATUS[0]}
[ "$code" = 0 ] || { echo "runbook: set-up failed (exit $code), no stage ran" >&2; exit "$code"; }
status=0
for stage in "${stages[@]}"; do
    echo "=== stage $stage ($(date -u +%H:%M:%S))"
    "stage_$stage" || status=1
done
echo "=== done ($(date -u +%H:%M:%S)), status $status"
exit $status
