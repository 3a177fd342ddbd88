"""Test helper: what the host lacks (a C compiler, CPU features) decides a kernel test's skip; a
kernel that fails to build or load where the host has what it needs fails the test instead."""

from __future__ import annotations

import platform
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest


@cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags")
                     for word in line.split(":", 1)[1].split())


def has_c_compiler() -> bool:
    """The host tool fornax builds its kernels with (the same search as runtime/kernels/build)."""
    from fornax.runtime.kernels.build import _compiler

    return _compiler() is not None


def x86_64() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


no_compiler = pytest.mark.skipif(not has_c_compiler(), reason="no C compiler on this host")


def cpu_lacks(*flags: str) -> pytest.MarkDecorator:
    """Skip where the CPU lacks a flag or there is no compiler: host facts, not fornax's."""
    missing = [f for f in flags if f not in cpu_flags()]
    return pytest.mark.skipif(bool(missing) or not has_c_compiler(),
                              reason=f"this host lacks {missing or 'a C compiler'}")


def require_kernel(loader: Callable[[], object]) -> object:
    """The loaded kernel library; where the host can build it, None is a failure."""
    lib = loader()
    assert lib is not None, f"{loader.__name__}() built nothing (see the fornax kernel log)"
    return lib
