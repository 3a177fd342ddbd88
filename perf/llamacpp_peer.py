"""llama.cpp's llama-server as a `bench serve` peer: where the built binary lives, its flags (CLI process).

`python -m tools.build_llama_server` builds the binaries into `build_dir()`; `bench serve --peer
llama.cpp` starts `llama-server` from there (or from `--peer-binary`) on the same GGUF, threads and
workload as fornax, with prompt caching off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The llama-cpp-python release whose vendored llama.cpp is built (pinned: the peer must not drift).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BUILD_MARKER = "fornax-llama-build.json"  # written last by tools/build_llama_server.py
BUILD_COMMAND = "python -m tools.build_llama_server"
BINARIES: tuple[str, ...] = ("llama-server", "llama-quantize")
# Fields llama-server reads on /v1/completions besides the OpenAI ones the bench sends
# (`max_tokens` is its alias of `n_predict`; `ignore_eos` and `stream_options.include_usage` are
# read as-is): no reuse of a slot's cached prompt, so every prompt is prefilled in full.
REQUEST_EXTRA: dict[str, Any] = {"cache_prompt": False}
CTX_ALIGN = 256


def build_dir(version: str = LLAMA_CPP_PYTHON_VERSION,
              cache: str | os.PathLike[str] | None = None) -> Path:
    """Where the binaries of `version` live: <fornax cache>/llama.cpp/<version>."""
    from fornax.runtime.loaders.cache_folders import cache_root

    return cache_root(cache) / "llama.cpp" / version


def read_build(folder: Path) -> dict[str, Any] | None:
    """The build record when `folder` holds a complete build (marker and every binary), else None."""
    try:
        record = json.loads((folder / BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if not all((folder / "bin" / name).is_file() for name in BINARIES):
        return None
    return record


def find_binary(name: str = "llama-server", version: str = LLAMA_CPP_PYTHON_VERSION,
                cache: str | os.PathLike[str] | None = None) -> Path | None:
    """The built `name` binary of `version`, or None when it was not built yet."""
    folder = build_dir(version, cache)
    return folder / "bin" / name if read_build(folder) is not None else None


def resolve_binary(explicit: str | None) -> Path:
    """`--peer-binary` when given, else the one built into the cache; SystemExit saying how to
    build it when there is none."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise SystemExit(f"--peer-binary {explicit}: not an executable file")
        return path
    found = find_binary()
    if found is None:
        raise SystemExit(f"llama-server is not built yet (looked in {build_dir()}); build it "
                         f"once with `{BUILD_COMMAND}` (several minutes) or pass --peer-binary")
    return found


def binary_version(binary: Path) -> str:
    """What `llama-server --version` prints (its build number and commit), "" when it fails."""
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return "; ".join(ln for ln in lines if "version" in ln.lower() or "built" in ln.lower())[:300]


def per_request_ctx(max_prompt_len: int, max_output_len: int) -> int:
    """A slot's context for the workload: longest prompt + longest output + 10% slack (the peer
    re-tokenizes text prompts), rounded up to CTX_ALIGN."""
    need = (max_prompt_len + max_output_len) * 1.1 + 16
    return int(math.ceil(need / CTX_ALIGN) * CTX_ALIGN)


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """True when /proc/cpuinfo (or the text given) lists the amx_tile flag."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    return any(line.startswith("flags") and "amx_tile" in line.split()
               for line in cpuinfo.splitlines())


def server_command(binary: Path, gguf: Path, port: int, *, threads: int, parallel: int,
                   ctx_per_request: int, extra: list[str] | None = None,
                   no_repack: bool = False) -> list[str]:
    """llama-server's command line: same threads for decode (-t) and prompts (-tb), one slot per
    concurrent request (-np) with continuous batching (-cb), -c = slots x per-request context,
    prompt caching off (--no-cache-prompt, --cache-ram 0). `no_repack` adds --no-repack before
    `extra` (so `extra` may say --repack again): the pinned llama.cpp's AMX path
    (ggml_backend_amx_mul_mat, used for Q4_0/Q4_1/Q8_0 when built native on an AMX CPU) dies
    with SIGSEGV at its first matmul on the Xeon this was built on."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-cb",
            "-c", str(parallel * ctx_per_request), "--no-cache-prompt", "--cache-ram", "0",
            "--no-webui", *(["--no-repack"] if no_repack else []), *(extra or [])]
