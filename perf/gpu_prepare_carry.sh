#!/usr/bin/env bash
# Build .whl/, the folder a GPU session carries to the device machine (which has no package
# registry): flashinfer (repacked as tar.xz: the 62 MB wheel is 17 MB that way, so everything fits
# one call's 64 MiB with the repo), apache-tvm-ffi (flashinfer's JIT loader), msgspec (the
# engine's message structs) and pytest-timeout (the runbook's per-test limit), all for the
# device's CPython 3.12 on x86-64.
# Run here, in the repo root, once per machine: perf/gpu_prepare_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FLASHINFER=${FLASHINFER:-flashinfer-python==0.7.2.post1}
TVM_FFI=${TVM_FFI:-apache-tvm-ffi==0.1.15.post2}
MSGSPEC=${MSGSPEC:-msgspec==0.22.0}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-pytest-timeout==2.4.0}

mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl "$TVM_FFI" "$MSGSPEC" \
    "$PYTEST_TIMEOUT"

if ! ls .whl/flashinfer-*.tar.xz >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps -d "$tmp" "$FLASHINFER"
    (cd "$tmp" && mkdir x && cd x && unzip -q ../flashinfer_python-*.whl \
        && find . -name __pycache__ -prune -exec rm -rf {} + \
        && tar cf - flashinfer flashinfer_python-*.dist-info | xz -T0 -6 > "$tmp/fi.tar.xz")
    version=$(basename "$tmp"/flashinfer_python-*.whl | cut -d- -f2)
    mv "$tmp/fi.tar.xz" ".whl/flashinfer-$version.tar.xz"
    rm -rf "$tmp"
fi
ls -la .whl
du -sh .whl
