"""oneDNN pre-packed bf16 weights on CPU: same numbers as plain F.linear, dropped on deep sleep."""

from __future__ import annotations

import pytest
import torch

from fornax.runtime.kernels.packing import pack_weight, packed_linear, packing_supported
from fornax.runtime.sampling.params import SamplingParams
from helpers.bench import run_bench
from helpers.native import cpu_lacks, x86_64

# torch's x86 CPU build (what `make install` installs) packs bf16 weights: only another CPU
# architecture is a reason to skip
pytestmark = pytest.mark.skipif(not x86_64(), reason="oneDNN bf16 packing is tested on x86-64")


def test_packing_is_supported():
    assert packing_supported(torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_linear_is_bit_identical(rows):
    torch.manual_seed(rows)
    weight = torch.randn(96, 64).to(torch.bfloat16)
    bias = torch.randn(96).to(torch.bfloat16)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    packed = pack_weight(weight, "onednn")
    assert packed.amx is None
    assert torch.equal(packed_linear(x, packed, bias), torch.nn.functional.linear(x, weight, bias))
    assert torch.equal(packed_linear(x, packed, None), torch.nn.functional.linear(x, weight))


def _linears(llm):
    return [m for m in llm.engine.runner.model.modules() if hasattr(m, "packed_weight")]


def test_bf16_engine_packs_and_generates_the_same_tokens(make_llm, monkeypatch):
    prompts = ["The quick brown fox", "Once upon a time there was"]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    # the packed linears op by op (the fused call has its own parity tests: test_fused_decode*)
    monkeypatch.setenv("FORNAX_FUSED_DECODE", "0")
    packed = make_llm("llama", dtype="bfloat16")
    assert all(m.packed_weight is not None for m in _linears(packed))
    plain = make_llm("llama", dtype="bfloat16")
    for module in _linears(plain):
        module.packed_weight = None
    got, expected = packed.generate(prompts, params), plain.generate(prompts, params)
    for a, b in zip(got, expected):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [d.logprob for step in a.outputs[0].logprobs for d in step.values()] == \
            [d.logprob for step in b.outputs[0].logprobs for d in step.values()]


def test_deep_sleep_drops_packed_weights_and_wake_repacks(make_llm):
    llm = make_llm("llama", dtype="bfloat16")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    before = llm.generate(["Hello there"], params)[0].outputs[0].token_ids
    llm.engine.sleep(level=2)
    assert all(m.packed_weight is None for m in _linears(llm))
    llm.engine.wake_up()
    assert all(m.packed_weight is not None for m in _linears(llm))
    assert llm.generate(["Hello there"], params)[0].outputs[0].token_ids == before


def test_float32_models_do_not_pack(make_llm):
    assert all(m.packed_weight is None for m in _linears(make_llm("llama")))


@pytest.mark.parametrize("with_amx", [False, pytest.param(True, marks=cpu_lacks("amx_bf16",
                                                                               "amx_tile"))])
def test_bench_cpu_linear_writes_a_valid_record(tmp_path, monkeypatch, with_amx):
    """oneDNN alone on CPUs without AMX; both kernels and their ratio where AMX exists."""

    import fornax.runtime.kernels.amx_linear as amx_module
    if not with_amx:  # the benchmark asks the module at run time
        monkeypatch.setattr(amx_module, "amx_supported", lambda: False)
    rec = run_bench(tmp_path, "cpu-linear", "--rows", "1,40", "--rounds", "1", "--num-layers", "2",
                    "--hidden-size", "64", "--intermediate-size", "96", "--num-heads", "2",
                    "--num-kv-heads", "1", "--head-dim", "32", "--vocab-size", "256")
    m = rec["metrics"]
    # 2 layers x (qkv 128x64 + o 64x64 + gate_up 192x64 + down 64x96) + head 256x64, bf16
    weights = 2 * (128 * 64 + 64 * 64 + 192 * 64 + 64 * 96) + 256 * 64
    assert m["weight_gbytes"] == pytest.approx(weights * 2 / 1e9)
    for rows in (1, 40):
        assert m[f"onednn_ms_m{rows}"] > 0
        assert m[f"onednn_gflops_m{rows}"] == pytest.approx(
            2 * rows * weights / (m[f"onednn_ms_m{rows}"] / 1e3) / 1e9)
        if with_amx:
            assert m[f"amx_speedup_m{rows}"] == pytest.approx(
                m[f"onednn_ms_m{rows}"] / m[f"amx_ms_m{rows}"])
        else:
            assert f"amx_ms_m{rows}" not in m
