"""GGUF weights kept quantized (#20): the prepared folder, the modules' slots, and outputs of the
quantized path against the dequantized one (FORNAX_GGUF_DEQUANTIZE=1, the path before #20)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from fornax.runtime import LLM, SamplingParams
from fornax.runtime.loaders.gguf_loader import prepare_gguf
from helpers.gguf_models import write_llama_gguf

PROMPTS = ["The quick brown fox", "Sphinx of black quartz, judge", "How vexingly 0123"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_quant")
    return {"file": write_llama_gguf(root / "tiny-mixed.gguf"), "cache": root / "cache"}


def _llm(model: str, cache, dequantize: bool, **kwargs) -> LLM:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORNAX_CACHE", str(cache))
        mp.setenv("FORNAX_GGUF_DEQUANTIZE", "1" if dequantize else "0")
        return LLM(model, max_model_len=256, max_num_seqs=4, **kwargs)


def _prompt_logprobs(llm: LLM, prompts: list[str]) -> list[list[float]]:
    """Each prompt token's logprob after the tokens before it (teacher forcing)."""
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    return [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
            for o in outs]


def test_quantized_folder_keeps_the_blocks(tiny):
    dense = prepare_gguf(tiny["file"], tiny["cache"])
    quant = prepare_gguf(tiny["file"], tiny["cache"], quantized=True)
    assert dense != quant and dense.parent == quant.parent  # both kinds coexist in the cache
    marker = json.loads((quant / "fornax-prepared.json").read_text())
    assert marker["quantized"] is True and marker["quantized_tensors"] == 14  # 1 + 2 * 7 - 1 F16
    with safe_open(str(quant / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "model.embed_tokens.weight.qdata" in names
        assert f.get_tensor("model.layers.0.self_attn.v_proj.weight.qdata").dtype == torch.int8
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight.qdata").dtype == torch.uint8
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight").dtype == torch.float16  # F16
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    size = (quant / "model.safetensors").stat().st_size
    assert size < (dense / "model.safetensors").stat().st_size / 3


# (dtype, quantized linear path, max |d logprob|, mean |d logprob|). The native kernel rounds
# activations to int8 per weight group: about 1% relative error per linear layer, which this
# random model's peaked logits turn into up to 0.32 nats (observed; mean 0.07). The reference
# path (dequantize + F.linear) differs from the dequantized folder only by the K-quant scales
# rounded to float16: observed 0.002. A wrong row order or segment would cost several nats.
PATHS = [("bfloat16", "native", 0.6, 0.15), ("float32", "native", 0.6, 0.15),
         ("float32", "reference", 0.02, 0.005)]


@pytest.mark.parametrize("dtype, path, max_tol, mean_tol", PATHS)
def test_tiny_mixed_gguf_matches_the_dequantized_path(tiny, monkeypatch, dtype, path, max_tol,
                                                      mean_tol):
    if path == "reference":
        from fornax.runtime.kernels import quant_linear

        monkeypatch.setattr(quant_linear, "_kernel", lambda: None)
    # float32 keeps weights quantized only when asked (--quantization gguf)
    quant = _llm(str(tiny["file"]), tiny["cache"], False, dtype=dtype, quantization="gguf")
    model = quant.engine.runner.model
    layers = model.model.layers
    qkv = layers[0].self_attn.qkv_proj
    # q (Q4_0) and k (Q4_K) are one q4 segment, v (Q6_K) a q8 segment of its own
    assert [(s.kind, s.out_features) for s in qkv.packed_weight.quant] == [("q4", 384), ("q8", 128)]
    assert qkv.weight.numel() == 0  # no dense copy next to the quantized one
    gate_up = layers[0].mlp.gate_up_proj.packed_weight.quant
    assert [(s.kind, s.source_type) for s in gate_up] == [("q4", "Q4_K"), ("q8", "Q8_0")]
    assert layers[0].mlp.down_proj.packed_weight.quant.source_type == "Q6_K"
    # layer 1's up_proj is F16: the fused gate|up stays dense, its Q4_K half dequantized into it
    assert layers[1].mlp.gate_up_proj.weight.shape == (1024, 256)
    assert layers[1].mlp.gate_up_proj.packed_weight is None or \
        layers[1].mlp.gate_up_proj.packed_weight.quant is None
    embed = model.model.embed_tokens
    assert embed.quant_weight is not None and embed.weight.numel() == 0
    assert model.lm_head.packed_weight.quant is embed.quant_weight  # tied: one table
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got_tokens = [o.outputs[0].token_ids for o in quant.generate(PROMPTS, params)]
    got = _prompt_logprobs(quant, PROMPTS)
    del quant

    ref_llm = _llm(str(tiny["file"]), tiny["cache"], True, dtype=dtype)
    assert ref_llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.weight.numel() > 0
    ref_tokens = [o.outputs[0].token_ids for o in ref_llm.generate(PROMPTS, params)]
    ref = _prompt_logprobs(ref_llm, PROMPTS)
    deltas = [abs(a - b) for g, r in zip(got, ref) for a, b in zip(g, r)]
    assert max(deltas) < max_tol and sum(deltas) / len(deltas) < mean_tol, deltas
    # a random model's logits hold near ties: the native path's greedy tokens may part after a
    # few (observed: at the 8th of one prompt); the reference path's never do
    n = 12 if path == "reference" else 4
    assert [t[:n] for t in got_tokens] == [t[:n] for t in ref_tokens]


def test_float32_dequantizes_at_load_unless_asked(tiny):
    llm = _llm(str(tiny["file"]), tiny["cache"], False, dtype="float32")
    model = llm.engine.runner.model
    assert model.model.embed_tokens.quant_weight is None
    assert all(m.packed_weight is None for m in model.modules() if hasattr(m, "packed_weight"))
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == (512, 256)


def test_quantization_gguf_needs_a_gguf_model(tiny_model):
    from fornax.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="--quantization gguf needs a GGUF model"):
        LLM(str(tiny_model("llama")), quantization="gguf", max_model_len=64)


# ------------------------------------------------------------------ the packaged SmolLM2

CHATS = ["What is the capital of France?", "List three primary colors.", "What is 12 times 12?",
         "Give me a tip for learning Python."]
TIE_NATS = 0.5  # four bf16 logit steps (0.125 each at these magnitudes)


@pytest.mark.slow
def test_smollm2_quantized_greedy_and_logprobs_track_the_dequantized_path(packaged_gguf, tmp_path):
    """bfloat16, the default on this CPU. SmolLM2-135M often hesitates between two tokens (top
    two within a bf16 logit step or two), where bf16 against float32 flips too, so greedy outputs
    must agree up to their first divergence, and a divergence may only happen where the
    dequantized reference itself hesitates: both tokens in its top two, within TIE_NATS of each
    other. Logprobs are compared by teacher forcing: both paths score the dequantized path's
    continuation, through the decode kernel."""
    from fornax.runtime.kernels import quant_linear

    convs = [[{"role": "user", "content": q}] for q in CHATS]
    scored = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    runs = {}
    for dequantize in (True, False):
        llm = _llm(str(packaged_gguf), tmp_path, dequantize, dtype="bfloat16")
        assert (llm.engine.runner.model.model.embed_tokens.quant_weight is None) == dequantize
        outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=32, logprobs=2))
        if dequantize:
            ref_top2 = [o.outputs[0].logprobs for o in outs]
            sequences = [o.prompt_token_ids + o.outputs[0].token_ids for o in outs]
            starts = [len(o.prompt_token_ids) for o in outs]
        with pytest.MonkeyPatch.context() as mp:  # the whole prompt through the decode kernel
            mp.setattr(quant_linear, "DENSE_MIN_ROWS", 1 << 30)
            forced = llm.generate([{"prompt_token_ids": s} for s in sequences], scored)
        runs[dequantize] = ([o.outputs[0].token_ids for o in outs],
                            [[(d[t].logprob, max(d, key=lambda k: d[k].logprob))
                              for d, t in zip(o.prompt_logprobs[start:], seq[start:])]
                             for o, seq, start in zip(forced, sequences, starts)])
        del llm
    (ref_tokens, ref_lp), (got_tokens, got_lp) = runs[True], runs[False]
    agreed = 0
    for got, ref, top2 in zip(got_tokens, ref_tokens, ref_top2):
        split = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        agreed += len(ref) if split is None else split
        if split is not None:  # the reference hesitated there between exactly these two
            ranked = sorted(top2[split].items(), key=lambda kv: -kv[1].logprob)[:2]
            assert {got[split], ref[split]} == {ranked[0][0], ranked[1][0]}, (got, ref, split)
            assert ranked[0][1].logprob - ranked[1][1].logprob < TIE_NATS, (ref, split)
    assert agreed >= 3 * len(CHATS)  # a floor: on average 3+ shared tokens before any split
    deltas = [abs(a[0] - b[0]) for r, g in zip(ref_lp, got_lp) for a, b in zip(r, g)]
    agree = [a[1] == b[1] for r, g in zip(ref_lp, got_lp) for a, b in zip(r, g)]
    print(f"\n{len(deltas)} tokens: max |d logprob| {max(deltas):.3f}, mean "
          f"{sum(deltas) / len(deltas):.4f}, argmax agreement {sum(agree) / len(agree):.3f}")
    # int8 activations per weight group against bf16 ones, every position through the kernel:
    # observed (this Xeon) 90 tokens, max 0.55, mean 0.10, argmax agreement 0.92
    assert max(deltas) < 1.0 and sum(deltas) / len(deltas) < 0.15
    assert sum(agree) / len(agree) >= 0.85


def test_sleep_level_2_and_wake_up_keep_the_weights_quantized(tiny):
    """Level 2 frees the weights; wake-up reloads them quantized into parameters re-created at
    their full shape (the loader empties the dense tensor of a kept weight), same outputs."""
    llm = _llm(str(tiny["file"]), tiny["cache"], False, dtype="bfloat16")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    embed = llm.engine.runner.model.model.embed_tokens
    assert embed.quant_weight is not None and embed.weight.numel() == 0
    llm.engine.sleep(2)
    llm.engine.wake_up()
    embed = llm.engine.runner.model.model.embed_tokens
    assert embed.quant_weight is not None and embed.weight.numel() == 0
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == before
    llm.close()


def test_without_the_native_kernel_weights_are_dequantized_at_load(tiny, monkeypatch):
    """quant_linear's torch fallback dequantizes a whole weight per call: without the kernel the
    loader dequantizes once instead (the path before #20)."""
    from fornax.runtime.kernels import build

    monkeypatch.setattr(build, "load_quant_linear", lambda: None)
    llm = _llm(str(tiny["file"]), tiny["cache"], False, dtype="bfloat16")
    embed = llm.engine.runner.model.model.embed_tokens
    assert embed.quant_weight is None and embed.weight.shape[0] > 0
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4
    llm.close()
