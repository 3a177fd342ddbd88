"""dtype=auto: bfloat16 on CPUs with native bf16 (AVX512-BF16 or AMX), float32 on other CPUs, the
checkpoint's own dtype on a GPU; explicit dtypes are kept."""

from __future__ import annotations

import pytest
import torch

from fornax.runtime.loaders import weights
from helpers.native import cpu_flags

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
@pytest.mark.parametrize("checkpoint", ["float32", "bfloat16", "float16"])
def test_auto_on_cpu_follows_the_cpu_not_the_checkpoint(monkeypatch, native, expected, checkpoint):
    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: native)
    assert weights.resolve_dtype("auto", {"torch_dtype": checkpoint}, CPU) == expected


def test_explicit_dtypes_and_the_gpu_rule_are_kept(monkeypatch):
    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: True)
    assert weights.resolve_dtype("float32", {"torch_dtype": "bfloat16"}, CPU) == torch.float32
    gpu = torch.device("cuda")
    assert weights.resolve_dtype("auto", {"torch_dtype": "float16"}, gpu) == torch.float16
    assert weights.resolve_dtype("auto", {}, gpu) == torch.float32


def test_native_bf16_detection_matches_the_cpu_flags():
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo on this host")
    assert weights.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


def test_an_engine_built_with_defaults_runs_the_fast_dtype(make_llm):
    llm = make_llm("llama", dtype="auto")
    expected = torch.bfloat16 if weights.cpu_has_native_bf16() else torch.float32
    assert llm.engine.runner.dtype == expected
    assert llm.engine.info.dtype == str(expected).removeprefix("torch.")
