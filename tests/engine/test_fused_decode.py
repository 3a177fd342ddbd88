"""The decoder layer stack in one C call for decode-only CPU steps (#20 item 4): same greedy
tokens and logprobs as the per-op path (FORNAX_FUSED_DECODE=0), on quantized GGUF weights."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as T

from fornax.runtime import LLM, SamplingParams
from fornax.runtime.kernels.quant_linear import DENSE_MIN_ROWS
from helpers.fused_spy import spy_fused_calls
from helpers.gguf_models import MIXED_TYPES, write_llama_gguf

PROMPTS = ["The quick brown fox", "Sphinx of black quartz, judge my vow", "How vexingly 0123",
           "Pack my box with five dozen liquor jugs! " * 3]
_LINEARS = ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
            "ffn_down")
# One kind everywhere: q4 groups of 32 (Q4_1), q8 groups of 32 (Q8_0) and of 16 (Q6_K repacked);
# "mixed": q|k|v of Q4_0, Q4_K and Q6_K (a q4 and a q8 segment) and gate|up of Q4_K and Q8_0, as
# in Q4_K_M files (helpers.gguf_models.MIXED_TYPES without its dense F16 weight).
TYPES = {**{name: dict.fromkeys(_LINEARS, kind)
            for name, kind in (("q4_1", T.Q4_1), ("q8_0", T.Q8_0), ("q6_k", T.Q6_K))},
         "mixed": {k: v for k, v in MIXED_TYPES.items() if v != T.F16}}
# Both paths call the same C functions at the same bf16 rounding points: observed bit-equal
# logprobs; the tolerance leaves room for float32 sums vectorized differently by the compiler.
LOGPROB_TOL = 1e-3


def _llm(model: str, cache, fused: bool, **kwargs) -> LLM:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORNAX_CACHE", str(cache))
        mp.setenv("FORNAX_FUSED_DECODE", "1" if fused else "0")
        kwargs.setdefault("enable_prefix_caching", False)
        return LLM(model, max_model_len=256, max_num_seqs=4, dtype="bfloat16", **kwargs)


def _run(llm: LLM, prompts: list[str], max_tokens: int) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params)
    return [(list(o.outputs[0].token_ids),
             [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def _compare(model: str, cache, monkeypatch, max_tokens: int) -> list[int]:
    calls = spy_fused_calls(monkeypatch)
    results = {}
    for fused in (True, False):
        llm = _llm(model, cache, fused)
        assert (llm.engine.runner.model.model.fused_decode is not None) == fused
        # four streams at once (decode steps of 4, 3, ... rows), then one alone (batch 1)
        results[fused] = _run(llm, PROMPTS, max_tokens) + _run(llm, PROMPTS[:1], max_tokens)
        llm.close()
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results[True], results[False]):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) <= LOGPROB_TOL
    return calls


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_fused_decode_matches_the_per_op_path(tmp_path, monkeypatch, kind):
    model = write_llama_gguf(tmp_path / f"tiny-{kind}.gguf", TYPES[kind])
    calls = _compare(str(model), tmp_path / "cache", monkeypatch, max_tokens=40)
    # the decode steps took the one call: 4 rows first, then 1 alone (and the lone prompt's
    # prefill, a small step, too); never a step of more rows than the decode kernel takes
    assert 4 in calls and 1 in calls and max(calls) < DENSE_MIN_ROWS


def test_a_part_dense_weight_takes_the_fused_call_too(tmp_path, monkeypatch):
    """Layer 1's gate|up half F16 (the joined weight dequantized to dense bf16 at load) beside
    quantized weights: the call multiplies it as a dense weight (dense_matmul.h)."""
    calls = _compare(str(write_llama_gguf(tmp_path / "mixed.gguf")), tmp_path / "cache",
                     monkeypatch, max_tokens=24)
    assert 4 in calls and 1 in calls


def test_sleep_level_2_drops_the_plan_and_wake_up_rebuilds_it(tmp_path):
    llm = _llm(str(write_llama_gguf(tmp_path / "q8.gguf", TYPES["q8_0"])), tmp_path / "cache",
               True)
    before = _run(llm, PROMPTS, 12)
    decoder = llm.engine.runner.model.model
    llm.engine.sleep(2)
    assert decoder.fused_decode is None  # it pointed at the released weights
    llm.engine.wake_up()
    assert decoder.fused_decode is not None
    assert _run(llm, PROMPTS, 12) == before
    llm.close()


@pytest.mark.slow
def test_smollm2_fused_decode_matches_the_per_op_path(packaged_gguf, tmp_path, monkeypatch):
    """The packaged default model (Q4_1, 30 layers, 9 query heads over 3 kv heads)."""
    calls = _compare(str(packaged_gguf), tmp_path, monkeypatch, max_tokens=48)
    assert 1 in calls


@pytest.fixture
def portable_kernels(monkeypatch):
    """Every C kernel built for a plain AVX2 CPU (x86-64-v3: no AVX-512, so the plain C
    quantized loop and the portable attention), loaded afresh, and the native ones back after."""
    import platform

    from fornax.runtime.kernels import amx_linear, build, quant_linear

    if platform.machine() != "x86_64":
        pytest.fail("this test builds x86-64-v3 kernels")
    loaders = [build.load_paged_decode, build.load_paged_prefill, build.load_fused_ops,
               build.load_amx_linear, build.load_quant_linear, build.load_decode_layers,
               quant_linear._kernel, amx_linear.amx_supported]
    flags = [f if f != "-march=native" else "-march=x86-64-v3" for f in build._FLAGS]
    monkeypatch.setattr(build, "_FLAGS", flags)
    monkeypatch.setattr(quant_linear, "_amx", lambda: False)  # AMX comes with AVX-512
    for loader in loaders:
        loader.cache_clear()
    yield
    for loader in loaders:
        loader.cache_clear()


@pytest.mark.slow
def test_portable_build_fused_decode_matches_its_per_op_path(tmp_path, monkeypatch,
                                                             portable_kernels):
    from fornax.runtime.kernels.quant_linear import quant_isa

    assert quant_isa() == "c"
    model = write_llama_gguf(tmp_path / "tiny-mixed.gguf", TYPES["mixed"])
    calls = _compare(str(model), tmp_path / "cache", monkeypatch, max_tokens=24)
    assert 4 in calls and 1 in calls


def test_small_mixed_steps_take_the_fused_call(tmp_path, monkeypatch):
    """Prompts admitted while others decode (six prompts, four at a time, different lengths)
    are prefilled in the same fused call as the decodes, one decode-kernel row per prompt token
    (causal over the cache): same greedy tokens and logprobs as the per-op path, whose prefill
    runs the paged prefill kernel."""
    model = write_llama_gguf(tmp_path / "tiny-q4_1.gguf", TYPES["q4_1"])
    calls = spy_fused_calls(monkeypatch)
    prompts = PROMPTS + ["Jackdaws love my big sphinx", "Five boxing wizards jump"]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1)
              for n in (9, 30, 17, 25, 20, 12)]
    results = {}
    for fused in (True, False):
        llm = _llm(str(model), tmp_path / "cache", fused)
        outs = llm.generate(prompts, params)
        results[fused] = [(list(o.outputs[0].token_ids),
                           [d[t].logprob for d, t in zip(o.outputs[0].logprobs,
                                                         o.outputs[0].token_ids)])
                          for o in outs]
        lens = [len(o.prompt_token_ids) for o in outs]
        llm.close()
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results[True], results[False]):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) <= LOGPROB_TOL
    # the fifth and sixth prompts each joined three decoding streams: a call of 3 + its tokens
    assert 3 + lens[4] in calls and 3 + lens[5] in calls


def test_the_prefill_budget_keeps_chunks_on_the_fused_call(tmp_path, monkeypatch):
    """A long prompt arriving while a stream decodes is cut into chunks that fit the fused
    call beside the decode (the scheduler learns the call's row limit from the runner), every
    chunk step takes the call, the stream gets a token every step, and the chunked prompt
    generates what it generates prefilled alone."""
    from fornax.runtime.engine.messages import EngineCoreRequest

    model = write_llama_gguf(tmp_path / "tiny-q4_1.gguf", TYPES["q4_1"])
    calls = spy_fused_calls(monkeypatch)
    llm = _llm(str(model), tmp_path / "cache", True, prefill_itl_factor=2.0)
    engine = llm.engine
    limit = DENSE_MIN_ROWS - 1
    assert engine.scheduler.prefill_budget.fast_tokens == limit
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request(EngineCoreRequest("stream", list(range(20, 28)), params))
    engine.step()
    long_prompt = [(7 * i + 3) % 200 + 10 for i in range(150)]
    engine.add_request(EngineCoreRequest("long", long_prompt,
                                         SamplingParams(temperature=0, max_tokens=4,
                                                        ignore_eos=True)))
    long_req = engine.scheduler.requests["long"]
    chunks, long_tokens = [], []
    while long_req.num_output_tokens == 0:
        before, calls[:] = long_req.num_computed_tokens, []
        outputs = {o.request_id: o for o in engine.step()}
        assert len(outputs["stream"].new_token_ids) == 1
        chunks.append(long_req.num_computed_tokens - before)
        assert calls == [1 + chunks[-1]]  # the decode and the chunk in one fused call
        long_tokens += outputs["long"].new_token_ids if "long" in outputs else []
    assert max(chunks) <= limit - 1 and sum(chunks) == 150 and len(chunks) >= 4
    while engine.has_unfinished_requests():
        outputs = {o.request_id: o for o in engine.step()}
        long_tokens += outputs["long"].new_token_ids if "long" in outputs else []
    alone = llm.generate({"prompt_token_ids": long_prompt},
                         SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert long_tokens == alone[0].outputs[0].token_ids
    llm.close()


def test_a_prompt_rounds_alike_whole_or_as_a_tail_in_the_fused_call(tmp_path, monkeypatch):
    """Prompt rows in the fused call are attended by the per-op path's prefill kernel: a
    36-token prompt computed whole, then again from its cached 32-token prefix with its 4-token
    tail in the call, gives the same logprobs bit for bit, and so does the per-op path."""
    model = write_llama_gguf(tmp_path / "tiny-q4_1.gguf", TYPES["q4_1"])
    calls = spy_fused_calls(monkeypatch)
    prompt = {"prompt_token_ids": [(7 * i + 3) % 200 + 10 for i in range(36)]}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    runs = {}
    for fused in (True, False):
        llm = _llm(str(model), tmp_path / "cache", fused, enable_prefix_caching=True)
        runs[fused] = [llm.generate(prompt, params)[0].outputs[0] for _ in range(2)]
        llm.close()
    assert 36 in calls and 4 in calls  # the whole prompt, then the tail, each in one call
    outs = runs[True] + runs[False]
    for out in outs[1:]:
        assert out.token_ids == outs[0].token_ids
        assert [{t: lp.logprob for t, lp in d.items()} for d in out.logprobs] == [
            {t: lp.logprob for t, lp in d.items()} for d in outs[0].logprobs]
