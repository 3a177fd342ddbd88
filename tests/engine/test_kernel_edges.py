"""The CPU C kernels at their edges through the offline engine: the fused decode step's row
limit, a context at exactly max-model-len filling the cache's last slot, preemption, prefix-cache
hits that end mid-block, n > 1, aborts between steps, logprobs at their bound, thread counts.
Run them under the sanitizers too (tests/kernels/README.md): a fault kills the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from test_fused_decode import portable_kernels  # noqa: F401 (a fixture: the AVX2-only build)

from fornax.runtime import LLM, SamplingParams
from fornax.runtime.kernels import fused_decode
from fornax.runtime.kernels.quant_linear import DENSE_MIN_ROWS
from helpers.fused_spy import spy_fused_calls
from helpers.gguf_models import MIXED_TYPES, write_llama_gguf

BLOCK = 16
FUSED_MAX_ROWS = DENSE_MIN_ROWS - 1  # fused_decode.enable_fused_decode's limit


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """Q4_K_M-like: q|k|v and gate|up of several quantization kinds (the fused step joins them)."""
    folder = tmp_path_factory.mktemp("edges")
    return str(write_llama_gguf(folder / "tiny-mixed.gguf",
                                {k: v for k, v in MIXED_TYPES.items() if v != T.F16}))


def _llm(model: str, tmp_path, monkeypatch, fused: bool = True, **kwargs) -> LLM:
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FORNAX_FUSED_DECODE", "1" if fused else "0")
    args = dict(max_model_len=128, max_num_seqs=8, dtype="bfloat16", block_size=BLOCK,
                enable_prefix_caching=False)
    llm = LLM(model, **{**args, **kwargs})
    assert (llm.engine.runner.model.model.fused_decode is not None) == fused
    return llm


def _prompts(count: int) -> list[str]:
    return [f"Prompt number {i}: the {'quick ' * (i % 5)}brown fox" for i in range(count)]


def _greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def _tokens(outs) -> list[list[int]]:
    return [list(c.token_ids) for o in outs for c in o.outputs]


def test_decode_rows_around_the_fused_limit(model, tmp_path, monkeypatch):
    """1, 39, 40 and 41 requests decoding at once: up to 39 rows in the fused call, 40 and more
    op by op; the same greedy tokens as the per-op engine either way."""
    calls = spy_fused_calls(monkeypatch)
    results = {}
    for fused in (True, False):
        llm = _llm(model, tmp_path, monkeypatch, fused, max_num_seqs=FUSED_MAX_ROWS + 2)
        results[fused] = [_tokens(llm.generate(_prompts(n), _greedy(6)))
                          for n in (1, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1, FUSED_MAX_ROWS + 2)]
        llm.close()
    assert results[True] == results[False]
    assert all(len(t) == 6 for batch in results[True] for t in batch)
    assert 1 in calls and FUSED_MAX_ROWS in calls and max(calls) == FUSED_MAX_ROWS


@pytest.mark.parametrize("fused", [True, False])
def test_a_context_of_max_model_len_fills_the_last_slot_of_the_cache(model, tmp_path,
                                                                      monkeypatch, fused):
    """One sequence grows to exactly max-model-len in a cache of exactly its blocks (and the
    null block 0): its last token's K/V go to the last slot of the last block the cache has."""
    max_len = 4 * BLOCK
    llm = _llm(model, tmp_path, monkeypatch, fused, max_model_len=max_len,
               num_gpu_blocks_override=max_len // BLOCK + 1, max_num_batched_tokens=max_len)
    prompt = [7 + i % 50 for i in range(10)]
    out = llm.generate({"prompt_token_ids": prompt}, _greedy(max_len - len(prompt)))
    assert len(out[0].outputs[0].token_ids) == max_len - len(prompt)
    again = llm.generate({"prompt_token_ids": prompt}, _greedy(max_len - len(prompt)))
    assert _tokens(again) == _tokens(out)  # the blocks were freed and reused whole
    llm.close()


def test_preemption_and_resume(model, tmp_path, monkeypatch):
    """Eight sequences in a cache for three: decoding ones are preempted, recomputed, resumed."""
    llm = _llm(model, tmp_path, monkeypatch, num_gpu_blocks_override=13, max_model_len=64)
    prompts = [{"prompt_token_ids": [5 + i] * (3 + i)} for i in range(8)]
    outs = llm.generate(prompts, _greedy(48))
    assert llm.engine.stats()["num_preemptions"] > 0
    assert all(len(t) == 48 for t in _tokens(outs))
    llm.close()


def test_prefix_cache_hits_ending_mid_block_and_n_above_one(model, tmp_path, monkeypatch):
    """A prompt sharing 1.5 blocks with a cached one (the hit stops at the full block, the rest
    is recomputed into a fresh block), then n = 3 children sharing the prompt's blocks."""
    llm = _llm(model, tmp_path, monkeypatch, enable_prefix_caching=True)
    shared = [11 + i % 40 for i in range(BLOCK + BLOCK // 2)]
    first = llm.generate({"prompt_token_ids": shared + [3, 4, 5]}, _greedy(20))
    hit = llm.generate({"prompt_token_ids": shared + [6, 7]}, _greedy(20))
    assert llm.engine.stats()["prefix_cache_hits"] >= BLOCK
    assert hit[0].outputs[0].finish_reason == "length" and len(_tokens(hit)[0]) == 20
    again = llm.generate({"prompt_token_ids": shared + [3, 4, 5]}, _greedy(20))
    assert _tokens(again) == _tokens(first)  # the same request again, the same cached blocks
    children = llm.generate({"prompt_token_ids": shared},
                            SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=24,
                                           ignore_eos=True))
    assert [len(t) for t in _tokens(children)] == [24, 24, 24]
    llm.close()


def test_aborts_between_steps_free_blocks_the_next_requests_reuse(model, tmp_path, monkeypatch):
    llm = _llm(model, tmp_path, monkeypatch, num_gpu_blocks_override=16)
    engine, steps = llm.engine, [0]
    inner = engine.step
    aborted: list[str] = []
    ends: list = []  # the aborts' outputs, handed over with the next step's

    def step():
        outs = inner() + ends
        ends.clear()
        steps[0] += 1
        if steps[0] == 4:  # mid-decode: two of the four go, their blocks back to the pool
            victims = sorted({o.request_id for o in outs})[:2]
            aborted.extend(victims)
            ends.extend(engine.abort_requests(victims))
        return outs

    monkeypatch.setattr(engine, "step", step)
    outs = llm.generate(_prompts(4), _greedy(30))
    monkeypatch.setattr(engine, "step", inner)
    reasons = sorted(c.finish_reason for o in outs for c in o.outputs)
    assert len(aborted) == 2 and reasons == ["abort", "abort", "length", "length"]
    # the same cache size: requests preempted there are recomputed by the prefill path, whose
    # matmuls round differently from 40 rows on (quant_linear.DENSE_MIN_ROWS)
    reference = _llm(model, tmp_path, monkeypatch, num_gpu_blocks_override=16)
    assert _tokens(llm.generate(_prompts(6), _greedy(30))) == \
        _tokens(reference.generate(_prompts(6), _greedy(30)))
    reference.close()
    llm.close()


def test_logprobs_and_prompt_logprobs_at_their_bound(model, tmp_path, monkeypatch):
    llm = _llm(model, tmp_path, monkeypatch, max_logprobs=20)
    out = llm.generate(_prompts(3), _greedy(8, logprobs=20, prompt_logprobs=20))
    for o in out:
        assert len(o.outputs[0].logprobs) == 8
        assert all(20 <= len(step) <= 21 for step in o.outputs[0].logprobs)
        assert o.prompt_logprobs[0] is None and all(
            20 <= len(step) <= 21 for step in o.prompt_logprobs[1:])
    with pytest.raises(Exception, match="logprobs"):
        llm.generate(_prompts(1), _greedy(2, logprobs=21))
    llm.close()


def test_thread_counts_from_one_to_more_than_the_cores(model, tmp_path, monkeypatch):
    """The kernels share rows, panels and (sequence, head) items among however many threads
    torch has (here up to 5 on any host): the same greedy tokens at every count."""
    before = torch.get_num_threads()
    llm = _llm(model, tmp_path, monkeypatch)
    results = []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results.append(_tokens(llm.generate(_prompts(5), _greedy(12))))
    finally:
        torch.set_num_threads(before)
        llm.close()
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("build", ["native", "portable"])
def test_blocks_larger_than_the_portable_tile_and_rows_at_the_limit(model, tmp_path, monkeypatch,
                                                                    request, build):
    """--block-size 256 (the portable attention widens a block 128 positions at a time; it was
    refused, failing every request) with a context over one block, and 39 / 40 decode rows; on
    the native build and the AVX2-only one (x86-64-v3: the plain C loops)."""
    if build == "portable":
        request.getfixturevalue("portable_kernels")
    calls = spy_fused_calls(monkeypatch)
    long_prompt = {"prompt_token_ids": [9 + i % 60 for i in range(300)]}
    results = {}
    for fused in (True, False):
        llm = _llm(model, tmp_path, monkeypatch, fused, block_size=256, max_model_len=512,
                   max_num_seqs=FUSED_MAX_ROWS + 1)
        results[fused] = [_tokens(llm.generate(long_prompt, _greedy(6)))] + [
            _tokens(llm.generate(_prompts(n), _greedy(3))) for n in (FUSED_MAX_ROWS,
                                                                      FUSED_MAX_ROWS + 1)]
        llm.close()
    assert results[True] == results[False]
    assert len(results[True][0][0]) == 6
    assert FUSED_MAX_ROWS in calls and max(calls) == FUSED_MAX_ROWS


@pytest.mark.parametrize("fault", ["narrow table", "block outside the cache"])
def test_step_rows_the_kernel_would_read_past_fail_the_step_not_the_process(
        model, tmp_path, monkeypatch, fault):
    """The fused call reads each row's block ids up to its context and those blocks of the
    cache on trust; rows that do not fit (here forged) fail that step's requests with an error
    instead of reading past the table or the cache, and the engine goes on."""
    llm = _llm(model, tmp_path, monkeypatch)
    inner = fused_decode._kernel_rows
    blocks = llm.engine.runner.kv_caches[0].shape[0]

    def forged(metadata):
        rows = inner(metadata)
        if rows is None:
            return None
        table, seq_lens = rows
        if fault == "narrow table":
            return np.ascontiguousarray(table[:, :1]), seq_lens
        return table + blocks, seq_lens

    monkeypatch.setattr(fused_decode, "_kernel_rows", forged)
    prompt = {"prompt_token_ids": [9 + i % 60 for i in range(2 * BLOCK + 3)]}
    failed = llm.generate(prompt, _greedy(4))[0].outputs[0]
    assert failed.error is not None and "fused decode" in failed.error
    monkeypatch.setattr(fused_decode, "_kernel_rows", inner)
    assert len(_tokens(llm.generate(prompt, _greedy(4)))[0]) == 4
    llm.close()
