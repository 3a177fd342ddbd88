"""Build llama.cpp's llama-server + llama-quantize once into the fornax cache; a CLI tool.

The source is the llama.cpp tree vendored inside the `llama-cpp-python` sdist (fetched with
`pip download --no-binary llama-cpp-python --no-deps`: only that package as source, its build
backend as a wheel), so no extra source host is needed. The result lands in
`<fornax cache>/llama.cpp/<version>/bin/` with `fornax-llama-build.json` (the marker, written last)
recording the llama.cpp commit, the CMake flags and the build time. A second call returns at once.

    python -m tools.build_llama_server [--version 0.3.36] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fornax.perf.llamacpp_peer import (
    BINARIES,
    BUILD_MARKER,
    LLAMA_CPP_PYTHON_VERSION,
    binary_version,
    build_dir,
    read_build,
)

__all__ = ["CMAKE_FLAGS", "build_from_source", "ensure_built", "main"]

logger = logging.getLogger(__name__)

CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)

Builder = Callable[[Path, Path, int], dict[str, object]]


def _run(cmd: Sequence[str], cwd: Path | None = None, nice: bool = False) -> None:
    full = (["nice", "-n", "10", *cmd] if nice and shutil.which("nice") else list(cmd))
    print("+ " + " ".join(full), flush=True)
    subprocess.run(full, cwd=cwd, check=True)


def _cmake() -> str:
    """A cmake executable: PATH, else the venv's (installed with pip on demand)."""
    found = shutil.which("cmake")
    if found:
        return found
    venv_cmake = Path(sys.executable).parent / "cmake"
    if not venv_cmake.exists():
        _run([sys.executable, "-m", "pip", "install", "cmake"])
    return str(venv_cmake)


def _download_source(version: str, into: Path) -> Path:
    """Fetch and unpack the llama-cpp-python sdist; returns its vendor/llama.cpp folder."""
    _run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
          "-d", str(into), f"llama-cpp-python=={version}"])
    archives = sorted(into.glob("llama_cpp_python-*.tar.gz")) + sorted(
        into.glob("llama-cpp-python-*.tar.gz"))
    if not archives:
        raise RuntimeError(f"pip download left no llama-cpp-python sdist in {into}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(into, filter="data")
    sources = sorted(into.glob("*/vendor/llama.cpp"))
    if not sources:
        raise RuntimeError(f"no vendor/llama.cpp inside {archives[0].name}")
    return sources[0]


def _llama_commit(source: Path) -> dict[str, str]:
    """Which llama.cpp the sdist vendors: its git commit (the tree ships its .git), else the
    `update llama.cpp to ...@<sha>` line of the sdist's CHANGELOG."""
    info: dict[str, str] = {}
    try:
        sha = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip()
        if sha:
            info["llama_cpp_commit"] = sha
    except (OSError, subprocess.SubprocessError):
        pass
    changelog = source.parent.parent / "CHANGELOG.md"
    if "llama_cpp_commit" not in info and changelog.is_file():
        match = re.search(r"llama\.cpp@([0-9a-f]{7,40})", changelog.read_text(errors="replace"))
        if match:
            info["llama_cpp_commit"] = match.group(1)
    return info


def build_from_source(work: Path, dest: Path, jobs: int, version: str = LLAMA_CPP_PYTHON_VERSION
                      ) -> dict[str, object]:
    """Download, configure and build BINARIES under `work`; copy the binaries into dest/bin."""
    source = _download_source(version, work)
    print(f"llama.cpp source: {source}", flush=True)
    build = work / "build"
    cmake = _cmake()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run([cmake, "-S", str(source), "-B", str(build), *generator, *CMAKE_FLAGS], nice=True)
    _run([cmake, "--build", str(build), "--config", "Release", "-j", str(jobs), "--target",
          *BINARIES], nice=True)
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    for name in BINARIES:
        built = build / "bin" / name
        if not built.is_file():
            raise RuntimeError(f"the build produced no {built}")
        shutil.copy2(built, dest / "bin" / name)
    record: dict[str, object] = dict(_llama_commit(source))
    record["version_output"] = binary_version(dest / "bin" / "llama-server")
    return record


def ensure_built(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2,
                 cache: str | os.PathLike[str] | None = None,
                 builder: Builder | None = None) -> Path:
    """The folder holding the built binaries of `version`: builds once, later calls return at once.

    `builder(work_dir, dest_dir, jobs)` does the download + build (tests stub it); the marker is
    written only after it returns, so an interrupted build is redone on the next call.
    """
    from fornax.runtime.loaders.cache_folders import build_lock

    dest = build_dir(version, cache)
    if read_build(dest) is not None:
        print(f"llama.cpp {version} already built: {dest / 'bin'}", flush=True)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(dest.parent / f".{version}.lock"):
        if read_build(dest) is not None:  # another process built it while we waited
            return dest
        start = time.monotonic()
        run_builder: Builder = builder or (
            lambda work, out, n: build_from_source(work, out, n, version))
        with tempfile.TemporaryDirectory(prefix="fornax-llama-build-") as work:
            record = run_builder(Path(work), dest, jobs)
        record.update({
            "llama_cpp_python_version": version,
            "cmake_flags": list(CMAKE_FLAGS),
            "targets": list(BINARIES),
            "jobs": jobs,
            "build_seconds": round(time.monotonic() - start, 1),
            "machine": platform.machine(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        missing = [name for name in BINARIES if not (dest / "bin" / name).is_file()]
        if missing:
            raise RuntimeError(f"build finished but {dest / 'bin'} lacks one of {missing}")
        tmp = dest / (BUILD_MARKER + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(dest / BUILD_MARKER)  # the marker last: only a complete build has one
        print(f"built llama.cpp {version} in {record['build_seconds']} s: {dest / 'bin'}",
              flush=True)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.build_llama_server",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION,
                        help="llama-cpp-python release whose vendored llama.cpp is built")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    parser.add_argument("--cache", default=None, help="cache root (default: the fornax cache)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    folder = ensure_built(args.version, args.jobs, args.cache)
    print(json.dumps(read_build(folder), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
