"""The AMX bf16 linear kernel: F.linear's numbers for every row count, padding and bias; dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fornax.runtime.kernels.amx_linear import (
    AMX_MAX_ROWS,
    amx_linear,
    amx_supported,
    pack_for_amx,
)
from fornax.runtime.kernels.packing import pack_weight, packed_linear
from fornax.runtime.sampling.params import SamplingParams
from helpers.native import cpu_lacks

# the CPU's flags and the compiler decide the skip; where both exist the kernel must work
pytestmark = cpu_lacks("amx_bf16", "amx_tile")


def test_amx_is_used_where_the_cpu_has_it():
    assert amx_supported()


def _reference(x, weight, bias):
    out = x.float() @ weight.float().T
    return out + bias.float() if bias is not None else out


def test_amx_linear_refuses_a_pack_or_bias_of_another_size():
    """The kernel reads out_features (rounded up to 32) x K of the pack and out_features of the
    bias on trust: other sizes are refused before the call."""
    weight = torch.randn(64, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="packed"):
        amx_linear(torch.randn(2, 128).to(torch.bfloat16), pack_for_amx(weight), None, 64)
    with pytest.raises(ValueError, match="packed"):
        amx_linear(torch.randn(2, 64).to(torch.bfloat16), pack_for_amx(weight), None, 96)
    with pytest.raises(ValueError, match="bias"):
        amx_linear(torch.randn(2, 64).to(torch.bfloat16), pack_for_amx(weight),
                   torch.zeros(32, dtype=torch.bfloat16), 64)


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 32, 33, 300])
@pytest.mark.parametrize("out_features,in_features", [(96, 64), (100, 128), (1, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_amx_linear_matches_float_reference(rows, out_features, in_features, with_bias):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=gen).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    got = amx_linear(x, pack_for_amx(weight), bias, out_features)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    ref = _reference(x, weight, bias)
    # fp32 accumulation, one bf16 rounding at the end: within half a bf16 ulp of the exact sum
    torch.testing.assert_close(got.float(), ref, rtol=8e-3, atol=1e-3)
    same = (got == F.linear(x, weight, bias)).float().mean().item()
    assert same > 0.95, f"only {same:.3f} of the outputs equal F.linear's"


def test_amx_linear_reads_strided_rows_and_keeps_leading_dims():
    weight = torch.randn(64, 96).to(torch.bfloat16)
    wide = torch.randn(2, 5, 200).to(torch.bfloat16)
    x = wide[..., 10:106]  # last dim contiguous, rows 200 apart
    got = amx_linear(x, pack_for_amx(weight), None, 64)
    assert got.shape == (2, 5, 64)
    torch.testing.assert_close(got.float(), _reference(x.reshape(-1, 96), weight, None)
                               .view(2, 5, 64), rtol=8e-3, atol=1e-3)


def test_shapes_the_kernel_cannot_take_fall_back_to_onednn():
    weight = torch.randn(48, 40).to(torch.bfloat16)  # 40 inputs: not a multiple of 32
    assert pack_for_amx(weight) is None
    packed = pack_weight(weight, "auto")
    assert packed.amx is None and packed.onednn is not None
    x = torch.randn(3, 40).to(torch.bfloat16)
    assert torch.equal(packed_linear(x, packed, None), F.linear(x, weight))


def test_auto_uses_amx_for_decode_batches_and_onednn_above(monkeypatch):
    weight = torch.randn(64, 64).to(torch.bfloat16)
    packed = pack_weight(weight, "auto")
    assert packed.amx is not None and packed.onednn is not None
    calls = []
    from fornax.runtime.kernels import packing as cpu_packing

    real = cpu_packing.amx_linear
    monkeypatch.setattr(cpu_packing, "amx_linear",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    for rows in (1, AMX_MAX_ROWS, AMX_MAX_ROWS + 1, 256):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        torch.testing.assert_close(packed_linear(x, packed, None).float(),
                                   _reference(x, weight, None), rtol=8e-3, atol=1e-3)
    assert [s[0] for s in calls] == [1, AMX_MAX_ROWS]
    amx_only = pack_weight(weight, "amx")
    assert amx_only.onednn is None
    x = torch.randn(256, 64).to(torch.bfloat16)
    torch.testing.assert_close(packed_linear(x, amx_only, None).float(),
                               _reference(x, weight, None), rtol=8e-3, atol=1e-3)


def test_bf16_engine_on_amx_matches_onednn_greedy_tokens(make_llm, monkeypatch):
    prompts = ["The quick brown fox", "Once upon a time there was"]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    monkeypatch.setenv("FORNAX_CPU_LINEAR", "onednn")
    reference = make_llm("llama", dtype="bfloat16")
    monkeypatch.setenv("FORNAX_CPU_LINEAR", "amx")
    llm = make_llm("llama", dtype="bfloat16")
    linears = [m for m in llm.engine.runner.model.modules() if hasattr(m, "packed_weight")]
    assert any(m.packed_weight.amx is not None for m in linears)
    got, expected = llm.generate(prompts, params), reference.generate(prompts, params)
    for a, b in zip(got, expected):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
