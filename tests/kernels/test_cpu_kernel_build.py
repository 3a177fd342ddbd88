"""The C kernel build cache: a kernel is rebuilt when its source or a shared header changes."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from fornax.runtime.kernels import build
from helpers.native import no_compiler

pytestmark = no_compiler


def _answer(path: Path) -> int:
    fn = ctypes.CDLL(str(path)).answer
    fn.restype = ctypes.c_int
    return fn()


def test_a_header_edit_rebuilds_and_an_unchanged_tree_reuses(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "value.h").write_text("#define VALUE 1\n")
    (src / "other.h").write_text("/* a header this kernel does not include */\n")
    source = src / "kernel.c"
    source.write_text('#include "value.h"\nint answer(void) { return VALUE; }\n')
    compiler = build._compiler()
    assert compiler is not None
    first = build._build("kernel", source, compiler)
    assert first.parent == tmp_path / "cache" / "native"
    assert build._build("kernel", source, compiler) == first  # cached: same file, no rebuild
    (src / "value.h").write_text("#define VALUE 2\n")
    second = build._build("kernel", source, compiler)
    assert second != first
    assert (_answer(first), _answer(second)) == (1, 2)
    # moving text between headers (or renaming one) is a different tree too
    (src / "other.h").rename(src / "renamed.h")
    assert build._build("kernel", source, compiler) not in (first, second)


def test_every_kernel_includes_the_one_bf16_header():
    """One set of bf16 helpers: no kernel defines its own conversion."""
    for source in sorted(build._SRC_DIR.glob("*.c")):
        text = source.read_text()
        assert '#include "bf16.h"' in text, source.name
        assert "bf16_to_float(uint16_t" not in text, source.name
