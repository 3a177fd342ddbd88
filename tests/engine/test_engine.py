"""Engine behaviour on a tiny model: prefix caching, chunked prefill, preemption, seeds, stops."""

from __future__ import annotations

import pytest

from fornax.runtime import SamplingParams
from fornax.runtime.errors import RequestError

SHARED = "The shared system preamble that many requests start with, long enough to fill blocks. "
PROMPTS = [SHARED + tail for tail in ("one", "two two", "three three three", "four", "five!")]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_prefix_caching_on_and_off_give_identical_tokens(make_llm) -> None:
    plain = make_llm(enable_prefix_caching=False)
    cached = make_llm(enable_prefix_caching=True, block_size=8)
    expected = token_ids(plain.generate(PROMPTS, GREEDY))
    first = cached.generate(PROMPTS[:1], GREEDY)
    rest = cached.generate(PROMPTS[1:], GREEDY)
    assert token_ids(first + rest) == expected
    assert cached.engine.kv.stats.hits > 0
    assert all(o.num_cached_tokens > 0 for o in rest)
    assert plain.engine.kv.stats.hits == 0


def test_tiny_token_budget_forces_chunked_prefill_with_same_tokens(make_llm) -> None:
    reference = make_llm(enable_prefix_caching=False)
    chunked = make_llm(enable_prefix_caching=False, max_num_batched_tokens=16, block_size=16)
    assert token_ids(chunked.generate(PROMPTS, GREEDY)) == token_ids(
        reference.generate(PROMPTS, GREEDY))
    assert max(len(p) for p in chunked.tokenizer.encode_batch(PROMPTS)) > 16  # really chunked


def test_tiny_kv_pool_forces_preemption_with_same_tokens(make_llm) -> None:
    reference = make_llm(enable_prefix_caching=False)
    # 12 usable blocks of 16 tokens for 5 sequences growing to ~60 tokens: they cannot all fit.
    tight = make_llm(enable_prefix_caching=False, num_gpu_blocks=13, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    assert token_ids(tight.generate(PROMPTS, params)) == token_ids(
        reference.generate(PROMPTS, params))
    assert tight.engine.scheduler.num_preemptions > 0


def test_seeded_sampling_is_independent_of_batch_mates(make_llm) -> None:
    llm = make_llm()
    params = SamplingParams(temperature=5.0, top_p=0.99, top_k=100, seed=1234, max_tokens=20,
                            ignore_eos=True)
    alone = llm.generate(["tell me a story"], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.2, max_tokens=30, ignore_eos=True)
    mixed = llm.generate(["noise one", "tell me a story", "more noise here please"],
                         [others, params, others])
    assert mixed[1].outputs[0].token_ids == alone
    different = llm.generate(["tell me a story"], params.clone(seed=99))[0].outputs[0].token_ids
    assert different != alone


def test_sampling_filters_restrict_choices(make_llm) -> None:
    llm = make_llm()
    greedy = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    top1 = llm.generate(["abc"], SamplingParams(temperature=1.5, top_k=1, max_tokens=8,
                                                ignore_eos=True, seed=3))
    tiny_p = llm.generate(["abc"], SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=8,
                                                  ignore_eos=True, seed=3))
    full_min_p = llm.generate(["abc"], SamplingParams(temperature=1.5, min_p=1.0, max_tokens=8,
                                                      ignore_eos=True, seed=3))
    expected = greedy[0].outputs[0].token_ids
    for out in (top1, tiny_p, full_min_p):
        assert out[0].outputs[0].token_ids == expected


def test_stop_strings_max_tokens_and_n(make_llm) -> None:
    llm = make_llm()
    base = llm.generate(["count: 1 2 3"], SamplingParams(temperature=0, max_tokens=24,
                                                        ignore_eos=True))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 24
    assert len(base.text) > 4
    stop = base.text[2:4]
    cut = llm.generate(["count: 1 2 3"], SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                                       ignore_eos=True))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[: base.text.index(stop)]
    kept = llm.generate(["count: 1 2 3"], SamplingParams(
        temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True,
        ignore_eos=True))[0].outputs[0]
    assert kept.text == base.text[: base.text.index(stop) + len(stop)]
    many = llm.generate(["x"], SamplingParams(n=3, temperature=5.0, seed=5, max_tokens=6,
                                             ignore_eos=True))[0]
    assert [o.index for o in many.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 6 for o in many.outputs)


def test_token_id_prompts_logprobs_and_chat(make_llm, tiny_model) -> None:
    llm = make_llm()
    ids = llm.tokenizer.encode("hello there")
    by_ids = llm.generate([ids], GREEDY)[0]
    by_text = llm.generate("hello there", GREEDY)[0]
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids
    lp = llm.generate("hello", SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    for step, token in zip(lp.outputs[0].logprobs, lp.outputs[0].token_ids):
        assert token in step and step[token].rank == 1  # greedy picks the top-ranked token
        assert len(step) <= 4 and all(v.logprob <= 0 for v in step.values())
    chat = llm.chat([{"role": "user", "content": "hi"}], GREEDY)[0]
    rendered = llm.tokenizer.decode(chat.prompt_token_ids, skip_special_tokens=False)
    assert rendered.startswith("<|im_start|>user\nhi<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")


def test_stop_token_ids_end_generation_at_first_occurrence(make_llm) -> None:
    llm = make_llm()
    free = llm.generate(PROMPTS[0], GREEDY)[0].outputs[0].token_ids
    stop_id = free[5]
    first = free.index(stop_id)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24,
                                                  stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == free[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_bad_requests_are_refused_without_harming_the_engine(make_llm) -> None:
    llm = make_llm(max_model_len=64)
    with pytest.raises(RequestError, match="64"):
        llm.generate("word " * 100, GREEDY)
    with pytest.raises(RequestError, match="out of vocabulary"):
        llm.generate([[1, 2, 10_000_000]], GREEDY)
    # Decoding settings are checked once, at the edge (generate), not at construction.
    with pytest.raises(RequestError, match="top_p"):
        llm.generate("x", SamplingParams(top_p=0.0))
    with pytest.raises(RequestError, match="temperature"):
        llm.generate("x", SamplingParams(temperature=-1))
    with pytest.raises(RequestError, match="top_k"):
        llm.generate("x", SamplingParams(top_k=-5))
    # max_tokens past the context is clamped, not an error.
    out = llm.generate("hi", SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True))
    assert len(out[0].prompt_token_ids) + len(out[0].outputs[0].token_ids) == 64
    assert llm.generate("still serving", GREEDY)[0].outputs[0].token_ids


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_sleep_levels_free_memory_and_wake_up_answers_identically(make_llm) -> None:
    llm = make_llm(kv_cache_memory=256 * 2**20)
    before = llm.generate(PROMPTS, GREEDY)
    for level in (1, 2):
        awake_rss = _rss_mib()
        llm.engine.sleep(level)
        assert llm.engine.is_sleeping and llm.engine.runner.kv_caches == []
        params = list(llm.engine.runner.model.parameters())
        assert all(p.numel() == 0 for p in params) == (level == 2)
        assert _rss_mib() < awake_rss - 200  # the 256 MiB KV cache went back to the OS
        with pytest.raises(RequestError, match="sleeping"):
            llm.generate("x", GREEDY)
        llm.engine.wake_up()
        assert not llm.engine.is_sleeping
        assert token_ids(llm.generate(PROMPTS, GREEDY)) == token_ids(before)


def test_priority_is_honoured_or_refused(make_llm) -> None:
    fcfs = make_llm()
    with pytest.raises(RequestError, match="scheduling-policy priority") as err:
        fcfs.generate("x", GREEDY, priority=[1])
    assert err.value.param == "priority"
    # One sequence slot: the urgent request (lower value) runs first although it came last.
    llm = make_llm(scheduling_policy="priority", max_num_seqs=1)
    order: list[str] = []
    step = llm.engine.step

    def recording_step():
        outs = step()
        order.extend(o.request_id for o in outs if o.finish_reason and o.request_id not in order)
        return outs

    llm.engine.step = recording_step
    outs = llm.generate(["first", "second", "urgent"], SamplingParams(max_tokens=3, ignore_eos=True),
                        priority=[5, 5, -1])
    assert order.index(outs[2].request_id) < order.index(outs[1].request_id)
