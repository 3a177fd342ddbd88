"""Builds fornax's C kernels with the system compiler once per machine, caches and loads them."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import cache
from pathlib import Path

from fornax.runtime import env
from fornax.runtime.loaders.cache_folders import cache_root

logger = logging.getLogger(__name__)

_SRC_DIR = Path(__file__).with_name("csrc")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lock = threading.Lock()


def _cache_root() -> Path:
    return cache_root() / "native"


def _cpu_signature() -> str:
    """The CPU model and feature flags: -march=native code must not move to another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    for name in (env.CC.get(), "gcc", "cc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _source_digest(source: Path) -> bytes:
    """The kernel source and every header beside it (csrc/bf16.h, ...), each with its name, so
    an edit to a shared header rebuilds every kernel that may include it."""
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        digest.update(b"\0" + header.name.encode() + b"\0" + header.read_bytes())
    return digest.digest()


def _flags() -> list[str]:
    """_FLAGS, plus the sanitizers FORNAX_KERNEL_SANITIZE names (a test build; the host process
    must have libasan preloaded, tests/kernels/README.md)."""
    sanitize = env.KERNEL_SANITIZE.get()
    if not sanitize:
        return list(_FLAGS)
    # -O1: instrumented -O3 builds of the always-inlined kernels take minutes
    return [*("-O1" if f == "-O3" else f for f in _FLAGS), "-g", "-fno-omit-frame-pointer",
            f"-fsanitize={sanitize}", "-fno-sanitize-recover=all"]


def _build(name: str, source: Path, compiler: str) -> Path:
    flags = _flags()
    key = hashlib.sha256(_source_digest(source) + " ".join(flags).encode()
                         + _cpu_signature().encode() + compiler.encode()).hexdigest()[:16]
    target = _cache_root() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, str(source), "-o", str(out), "-lm"]
        # the compiler runs without the sanitizer runtime a sanitizing host preloads
        compile_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=compile_env,
                              timeout=600 if len(flags) > len(_FLAGS) else 120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders never see half a library
    logger.info("built native kernel %s with %s", target.name, compiler)
    return target


def _load(name: str) -> ctypes.CDLL | None:
    """Build (once per machine and source version) and load csrc/<name>.c, or None.

    torch is imported first so the kernel's OpenMP runtime resolves to the one torch already
    loaded (same soname): one thread pool, no oversubscription.
    """
    if not env.NATIVE_KERNELS.get():
        return None
    import torch  # noqa: F401  (loads libgomp before the kernel does)

    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found: CPU kernels fall back to pure torch")
        return None
    try:
        with _lock:
            path = _build(name, _SRC_DIR / f"{name}.c", compiler)
        return ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        if env.KERNEL_SANITIZE.get():
            raise  # a sanitizer run that quietly fell back to torch would check nothing
        logger.warning("native CPU kernel %s unavailable (%s): using pure torch", name, exc)
        return None


_vp, _i32, _i64, _f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


@cache
def load_paged_decode() -> ctypes.CDLL | None:
    """The CPU paged-decode attention kernel, or None (no compiler, build failure,
    FORNAX_NATIVE_KERNELS=0)."""
    lib = _load("paged_decode_cpu")
    if lib is not None:
        fn = lib.fornax_paged_decode
        fn.argtypes = [_vp, _vp, _vp, _i64, _vp, _vp, _i32, _i32, _i32, _i32, _i32, _f32, _i32,
                       _i32]
        fn.restype = _i32
    return lib


@cache
def load_paged_prefill() -> ctypes.CDLL | None:
    """The CPU paged-prefill attention kernel (bf16, needs AVX512-BF16), or None."""
    lib = _load("paged_prefill_cpu")
    if lib is None:
        return None
    lib.fornax_paged_prefill_supported.argtypes = []
    lib.fornax_paged_prefill_supported.restype = _i32
    if not lib.fornax_paged_prefill_supported():
        return None
    fn = lib.fornax_paged_prefill
    fn.argtypes = [_vp, _i64, _vp, _vp, _i64, _vp, _vp, _vp, _i32, _vp, _i64, _i32, _i32, _i32,
                   _i32, _f32, _i32]
    fn.restype = _i32
    return lib


@cache
def load_fused_ops() -> ctypes.CDLL | None:
    """The fused bf16 RMSNorm, SiLU-and-multiply and rotary kernels and a row argmax, or None."""
    lib = _load("fused_ops_cpu")
    if lib is not None:
        lib.fornax_rms_norm_bf16.argtypes = [_vp, _i64, _vp, _vp, _i32, _i32, _f32, _i32]
        lib.fornax_rms_norm_bf16.restype = None
        lib.fornax_silu_mul_bf16.argtypes = [_vp, _vp, _i32, _i32, _i32]
        lib.fornax_silu_mul_bf16.restype = None
        lib.fornax_argmax_f32.argtypes = [_vp, _i32, _i32, _vp, _i32]
        lib.fornax_argmax_f32.restype = _i32
        lib.fornax_rotary_bf16.argtypes = [_vp, _i64, _i64, _i32, _i32, _i32, _vp, _vp, _vp,
                                           _i32]
        lib.fornax_rotary_bf16.restype = None
    return lib


@cache
def load_amx_linear() -> ctypes.CDLL | None:
    """The AMX bf16 linear kernel, or None; callers check the CPU has AMX before using it."""
    lib = _load("amx_linear_cpu")
    if lib is not None:
        lib.fornax_amx_init.argtypes = []
        lib.fornax_amx_init.restype = _i32
        lib.fornax_amx_linear_bf16.argtypes = [_vp, _i64, _vp, _vp, _vp, _i64, _i64, _i64, _i64,
                                               _i32]
        lib.fornax_amx_linear_bf16.restype = _i32
    return lib


@cache
def load_quant_linear() -> ctypes.CDLL | None:
    """The weight-only quantized (q4/q8) linear kernel and its dequantizer, or None."""
    lib = _load("quant_linear_cpu")
    if lib is not None:
        lib.fornax_quant_linear_isa.argtypes = []
        lib.fornax_quant_linear_isa.restype = _i32
        lib.fornax_quant_linear.argtypes = [_vp, _vp, _i64, _i32, _vp, _vp, _i32, _i32]
        lib.fornax_quant_linear.restype = _i32
        lib.fornax_quant_dequantize.argtypes = [_vp, _vp, _vp, _i32, _i32, _i32, _i32, _vp,
                                                _i64, _i32, _vp, _i32, _i32]
        lib.fornax_quant_dequantize.restype = _i32
        lib.fornax_quant_to_amx.argtypes = [_vp, _i32, _i32, _vp, _i32]
        lib.fornax_quant_to_amx.restype = _i32
    return lib


@cache
def load_decode_layers() -> ctypes.CDLL | None:
    """The whole-layer-stack decode kernel (kernels/fused_decode.py), or None."""
    lib = _load("decode_layers_cpu")
    if lib is not None:
        lib.fornax_decode_layers_fields.argtypes = []
        lib.fornax_decode_layers_fields.restype = _i32
        lib.fornax_decode_layers_prompt_rows.argtypes = []
        lib.fornax_decode_layers_prompt_rows.restype = _i32
        lib.fornax_decode_layers.argtypes = [_vp, _i32, _vp, _f32, _f32, _vp, _i32, _vp, _vp, _vp,
                                             _i64, _vp, _i32, _vp, _vp, _vp, _vp, _i32]
        lib.fornax_decode_layers.restype = _i32
    return lib
