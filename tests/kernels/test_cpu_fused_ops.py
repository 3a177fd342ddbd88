"""Fused bf16 RMSNorm / SiLU-and-multiply C kernels against the eager torch layers they replace."""

from __future__ import annotations

import pytest
import torch

from fornax.runtime.kernels.build import load_fused_ops
from fornax.runtime.kernels.fused_ops import FusedCpuOps
from fornax.runtime.models.layers import RMSNorm, SiluAndMul
from fornax.runtime.sampling.params import SamplingParams
from helpers.native import no_compiler, require_kernel

pytestmark = no_compiler  # where a compiler exists, a kernel that does not build fails


@pytest.fixture(scope="module")
def ops() -> FusedCpuOps:
    return FusedCpuOps(require_kernel(load_fused_ops))


@pytest.mark.parametrize("rows,dim", [(1, 576), (33, 64), (3000, 576), (5, 100)])
def test_rms_norm_matches_eager(ops, rows, dim):
    torch.manual_seed(rows)
    norm = RMSNorm(dim, 1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(dim).to(torch.bfloat16)
    x = torch.randn(rows, dim).to(torch.bfloat16) * 3
    expected = norm(x)
    norm.fused = ops
    got = norm(x)
    # Same rounding points; only float32 summation order may move a value by one bf16 ulp.
    assert (got != expected).float().mean().item() < 1e-4
    assert torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_rms_norm_on_strided_head_views(ops):
    """q/k norms (Qwen3) see [T, H, D] views of the fused qkv output: not contiguous rows."""
    qkv = torch.randn(7, 3 * 4 * 32).to(torch.bfloat16)
    q = qkv[:, : 4 * 32].view(7, 4, 32)
    norm = RMSNorm(32).to(torch.bfloat16)
    expected = norm(q)
    norm.fused = ops
    assert torch.equal(norm(q), expected)


@pytest.mark.parametrize("rows,dim", [(1, 1536), (40, 1536), (9, 37)])
def test_silu_mul_matches_eager(ops, rows, dim):
    torch.manual_seed(dim)
    x = torch.randn(rows, 2 * dim).to(torch.bfloat16) * 4
    act = SiluAndMul()
    expected = act(x)
    act.fused = ops
    assert torch.equal(act(x), expected)


def test_silu_mul_keeps_nan_and_inf_as_eager(ops):
    """NaN, infinite and huge gate values (in the vector body and the scalar tail) give eager's
    bits: silu(-inf) is NaN and silu(g < -88.7) is -0, where exp(-g) overflows."""
    x = torch.randn(2, 2 * 37).to(torch.bfloat16)
    bits = x.view(torch.int16)
    bits[0, 3] = 0x7FFF  # NaN with every mantissa bit set
    bits[0, 37 + 5] = 0x7F81  # NaN with a low payload
    bits[0, 36] = -0x3F  # 0xFFC1: a negative NaN in the scalar tail (columns 32..36)
    x[1, 7], x[1, 37 + 9], x[1, 11] = float("inf"), float("-inf"), float("nan")
    x[1, :6] = torch.tensor([-float("inf"), -1e30, -120.0, -89.0, -88.5, 100.0])
    act = SiluAndMul()
    expected = act(x)
    act.fused = ops
    got = act(x)
    assert torch.equal(got.isnan(), expected.isnan())
    assert got.isnan().sum() >= 4
    same_bits = got.view(torch.int16) == expected.view(torch.int16)
    assert bool((same_bits | expected.isnan()).all())


def test_bf16_engine_uses_fused_ops_with_the_same_tokens(make_llm):
    prompts = ["The quick brown fox", "Once upon a time there was"]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    fused = make_llm("llama", dtype="bfloat16")
    modules = [m for m in fused.engine.runner.model.modules() if hasattr(m, "fused")]
    assert modules and all(m.fused is not None for m in modules)
    plain = make_llm("llama", dtype="bfloat16")
    for module in plain.engine.runner.model.modules():
        if hasattr(module, "fused"):
            module.fused = None
    got, expected = fused.generate(prompts, params), plain.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_fast_argmax_matches_torch_including_ties_and_nans():
    from fornax.runtime.kernels.fused_ops import fast_argmax

    torch.manual_seed(0)
    logits = torch.randn(33, 49152)
    logits[3, 10] = logits[3, 20] = 100.0  # a tie: the first index wins
    logits[4] = float("-inf")  # an all-masked row
    logits[5, :7] = float("-inf")
    assert torch.equal(fast_argmax(logits), logits.argmax(dim=-1))
    logits[6, 123] = float("nan")  # torch reports the NaN's index; so must we
    assert torch.equal(fast_argmax(logits), logits.argmax(dim=-1))
    assert torch.equal(fast_argmax(logits[:, :100]), logits[:, :100].argmax(dim=-1))


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotary_in_place_matches_eager(ops, partial):
    from fornax.runtime.models.rotary import RotaryEmbedding

    torch.manual_seed(1)
    rope = RotaryEmbedding(64, 2048, 10000.0, None, partial)
    qkv = torch.randn(11, (9 + 3 + 3) * 64).to(torch.bfloat16) * 2
    positions = torch.tensor([0, 1, 2, 5, 100, 1023, 2047, 7, 8, 9, 10])
    q = qkv[:, : 9 * 64].view(11, 9, 64)  # strided views, as the model splits its qkv output
    k = qkv[:, 9 * 64: 12 * 64].view(11, 3, 64)
    expected_q, expected_k = rope(positions, q, k)
    rope.fused = ops
    qkv_fused = qkv.clone()
    q2, k2 = qkv_fused[:, : 9 * 64].view(11, 9, 64), qkv_fused[:, 9 * 64: 12 * 64].view(11, 3, 64)
    got_q, got_k = rope(positions, q2, k2)
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
    assert got_q.data_ptr() == q2.data_ptr()  # rotated in place inside the qkv buffer
    assert torch.equal(qkv_fused[:, 12 * 64:], qkv[:, 12 * 64:])  # v untouched


def test_arguments_the_kernels_would_read_past_are_refused(ops):
    """Sizes and dtypes the C loops take on trust are checked once in the glue: a weight shorter
    than the row, an odd [gate | up], int32 positions (read as int64), fewer positions than
    tokens, a rotary_dim past the head."""
    x = torch.randn(3, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="rms_norm"):
        ops.rms_norm(x, torch.ones(32, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="rms_norm"):
        ops.rms_norm(x.float(), torch.ones(64, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="silu_mul"):
        ops.silu_mul(torch.randn(3, 63).to(torch.bfloat16))
    from fornax.runtime.models.rotary import RotaryEmbedding

    rope = RotaryEmbedding(64, 64, 10000.0)
    heads = torch.randn(4, 2, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="rotary"):
        ops.rotary(torch.arange(3), heads, rope.cos_cache, rope.sin_cache, 64)
    with pytest.raises(ValueError, match="rotary"):
        ops.rotary(torch.arange(4), heads, rope.cos_cache, rope.sin_cache, 128)
    expected = ops.rotary(torch.arange(4), heads.clone(), rope.cos_cache, rope.sin_cache, 64)
    got = ops.rotary(torch.arange(4, dtype=torch.int32), heads.clone(), rope.cos_cache,
                     rope.sin_cache, 64)
    assert torch.equal(got, expected)
