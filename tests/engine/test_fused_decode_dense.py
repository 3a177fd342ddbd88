"""The fused decode call on dense bf16 weights (#20): bf16 safetensors checkpoints of Llama, Qwen2
(q/k/v biases) and Qwen3 (per-head q/k RMSNorm) and the dequantized packaged GGUF give the per-op
path's greedy tokens and logprobs (FORNAX_FUSED_DECODE=0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_fused_decode import _llm, portable_kernels  # noqa: F401 (a fixture)

from fornax.runtime import SamplingParams
from helpers.fused_spy import spy_fused_calls

# Where the call multiplies dense weights on the AMX tiles, it runs amx_linear's own tile code,
# as the per-op path does: the same values (observed bit-equal). Elsewhere (AVX512-BF16 without
# AMX, the portable loop) the per-op path is oneDNN's matmul, whose float32 sums are rounded
# otherwise (on the AMX Xeon oneDNN runs on the tiles too; vdpbf16ps rounds after each pair): a
# bf16 activation flips by one unit now and then and spreads through the residual stream.
# Observed on the Xeon with AMX turned off: logprobs up to 0.08 apart on the tiny random Qwen3,
# 0.10 on the dequantized SmolLM2 (30 layers), which split once from the per-op path where the
# latter's top two tokens were 0.125 apart. Greedy tokens must agree until such a near tie.
EXACT_TOL = 1e-3
ROUNDING_TOL = 0.25
# Prompts of over 64 tokens: their prefill takes the per-op path on both sides (prompt chunks
# small enough for the call attend through the decode kernel there, rounded otherwise than by
# the prefill kernel), so the comparison is of the decode steps.
LONG_PROMPTS = [{"prompt_token_ids": [(7 * i + 31 * j) % 200 + 10 for i in range(70 + 13 * j)]}
                for j in range(4)]


def _bf16_checkpoint(src: Path, dst: Path, **config: object) -> Path:
    """src's checkpoint with every tensor in bfloat16 (config.json says so; `config` overrides
    shapes, the tensors then drawn afresh from a seeded normal)."""
    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    data.update(config, torch_dtype="bfloat16")
    (dst / "config.json").write_text(json.dumps(data))
    tensors = load_file(str(dst / "model.safetensors"))
    if config:
        import transformers

        from tools.make_tiny_model import _init_weights

        cfg = transformers.AutoConfig.from_pretrained(str(dst))
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        _init_weights(model, 1, cfg.vocab_size)
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()
                   if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _run(llm, prompts: list[dict], max_tokens: int) -> list[list[tuple[int, float, float]]]:
    """Per sequence, per token: (token, its logprob, the best other token's logprob)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    out = []
    for o in llm.generate(prompts, params):
        steps = []
        for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids):
            others = [lp.logprob for tok, lp in d.items() if tok != t]
            steps.append((t, d[t].logprob, max(others) if others else float("-inf")))
        out.append(steps)
    return out


def _compare(model: str, cache: Path, monkeypatch, max_tokens: int, **kwargs) -> list[int]:
    """Fused against per-op on four streams, then one alone; returns the fused calls' rows."""
    calls = spy_fused_calls(monkeypatch)
    results, amx = {}, False
    for fused in (True, False):
        llm = _llm(model, cache, fused, **kwargs)
        plan = llm.engine.runner.model.model.fused_decode
        assert (plan is not None) == fused
        amx = amx or bool(fused and plan._shape[-1])
        results[fused] = (_run(llm, LONG_PROMPTS, max_tokens)
                          + _run(llm, LONG_PROMPTS[:1], max_tokens))
        llm.close()
    tol = EXACT_TOL if amx else ROUNDING_TOL
    for got, ref in zip(results[True], results[False]):
        for (token, logprob, _), (ref_token, ref_logprob, ref_other) in zip(got, ref):
            if token != ref_token:  # only where the per-op path nearly tied
                assert not amx and ref_logprob - ref_other <= tol, (got, ref)
                break
            assert abs(logprob - ref_logprob) <= tol, (got, ref)
    return calls


@pytest.fixture
def no_amx(monkeypatch):
    """The per-op path on oneDNN and the call on its own vdpbf16ps loop (what a CPU with
    AVX512-BF16 but no AMX, such as a Zen 4, runs)."""
    from fornax.runtime.kernels import amx_linear, packing

    monkeypatch.setattr(amx_linear, "amx_supported", lambda: False)
    monkeypatch.setattr(packing, "amx_supported", lambda: False)


ARCHS = {"llama": {}, "qwen2": {},  # qwen2: q/k/v biases
         "qwen3": {},  # per-head q/k RMSNorm, head_dim 32 (the bf16 attention path)
         # q|k|v of 48 columns (a unit's tail lanes), one kv head of head_dim 8
         "qwen3-tail": {"num_key_value_heads": 1, "head_dim": 8, "num_attention_heads": 4}}


def _checkpoint(tiny_model, name: str, tmp_path: Path) -> Path:
    return _bf16_checkpoint(tiny_model(name.split("-")[0]), tmp_path / f"{name}-bf16",
                            **ARCHS[name])


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_dense_bf16_checkpoints_match_the_per_op_path(tiny_model, tmp_path, monkeypatch, name):
    calls = _compare(str(_checkpoint(tiny_model, name, tmp_path)), tmp_path / "cache",
                     monkeypatch, max_tokens=32)
    assert 4 in calls and 1 in calls  # four streams decoding, then one


@pytest.mark.parametrize("name", ["qwen2", "qwen3-tail"])
@pytest.mark.usefixtures("no_amx")
def test_without_amx_the_vdpbf16ps_loop_matches_onednn(tiny_model, tmp_path, monkeypatch, name):
    calls = _compare(str(_checkpoint(tiny_model, name, tmp_path)), tmp_path / "cache",
                     monkeypatch, max_tokens=32)
    assert 4 in calls and 1 in calls


@pytest.mark.slow
@pytest.mark.parametrize("amx", [True, False], ids=["amx-or-native", "no-amx"])
def test_dequantized_smollm2_matches_the_per_op_path(packaged_gguf, tmp_path, monkeypatch, amx,
                                                    request):
    """The packaged model's weights dequantized to dense bf16 (FORNAX_GGUF_DEQUANTIZE=1)."""
    if not amx:
        request.getfixturevalue("no_amx")
    monkeypatch.setenv("FORNAX_GGUF_DEQUANTIZE", "1")
    calls = _compare(str(packaged_gguf), tmp_path, monkeypatch, max_tokens=32)
    assert 1 in calls


@pytest.mark.slow
@pytest.mark.usefixtures("portable_kernels", "no_amx")
def test_portable_build_dense_matches_its_per_op_path(tiny_model, tmp_path, monkeypatch):
    """Every kernel built for a plain AVX2 CPU: the call's dense weights take the C loop."""
    calls = _compare(str(_checkpoint(tiny_model, "qwen3-tail", tmp_path)), tmp_path / "cache",
                     monkeypatch, max_tokens=24)
    assert 4 in calls and 1 in calls


@pytest.mark.usefixtures("no_amx")
def test_no_copy_of_dense_weights_past_the_memory_limit(tiny_model, tmp_path, monkeypatch):
    """Without AMX packs to share, the call's own copy of the dense weights has a size limit;
    past it the stack keeps the per-op path (and still generates)."""
    from fornax.runtime.kernels import fused_decode

    monkeypatch.setattr(fused_decode, "_COPY_MAX_BYTES", 1000)
    llm = _llm(str(_checkpoint(tiny_model, "llama", tmp_path)), tmp_path / "cache", True)
    assert llm.engine.runner.model.model.fused_decode is None
    assert len(_run(llm, LONG_PROMPTS[:1], 4)[0]) == 4
    llm.close()


@pytest.mark.parametrize("amx", [True, False], ids=["amx-or-native", "no-amx"])
def test_sleep_level_2_drops_the_dense_plan_and_wake_up_rebuilds_it(tiny_model, tmp_path, amx,
                                                                    request):
    if not amx:
        request.getfixturevalue("no_amx")  # the plan holds its own copy of the weights
    llm = _llm(str(_checkpoint(tiny_model, "qwen3", tmp_path)), tmp_path / "cache", True)
    before = _run(llm, LONG_PROMPTS, 12)
    decoder = llm.engine.runner.model.model
    llm.engine.sleep(2)
    assert decoder.fused_decode is None
    llm.engine.wake_up()
    assert decoder.fused_decode is not None
    assert _run(llm, LONG_PROMPTS, 12) == before
    llm.close()
