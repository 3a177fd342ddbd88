"""Generation parameters end to end in the offline engine, checked against HF where it has them."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fornax.runtime import SamplingParams
from fornax.runtime.sampling.beam_search import BeamSearchParams
from fornax.runtime.scheduler.scheduler import REPETITION_STOP_REASON

PROMPTS = ["Hello world", "The quick brown fox jumps", "def f(x):\n    return x"]


def hf_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model, AutoTokenizer.from_pretrained(path)


def test_logprobs_match_hf_log_softmax_for_generated_and_prompt_tokens(tiny_model,
                                                                       make_llm) -> None:
    path = tiny_model("llama")
    llm = make_llm("llama")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    outs = llm.generate(PROMPTS, params)
    model, tok = hf_model(path)
    for prompt, out in zip(PROMPTS, outs):
        full = out.prompt_token_ids + out.outputs[0].token_ids
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
        n_prompt = len(out.prompt_token_ids)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n_prompt
        for pos in range(1, n_prompt):
            entry = out.prompt_logprobs[pos]
            token = full[pos]
            assert abs(entry[token].logprob - ref[pos - 1, token].item()) < 1e-4
            assert entry[token].rank == int((ref[pos - 1] > ref[pos - 1, token]).sum()) + 1
            top2 = ref[pos - 1].topk(2).indices.tolist()
            assert set(top2) <= set(entry)
        for step, token in enumerate(out.outputs[0].token_ids):
            entry = out.outputs[0].logprobs[step]
            assert abs(entry[token].logprob - ref[n_prompt + step - 1, token].item()) < 1e-4
        assert abs(out.outputs[0].cumulative_logprob - sum(
            ref[n_prompt + s - 1, t].item() for s, t in enumerate(out.outputs[0].token_ids))
        ) < 1e-3


def test_beam_search_equals_hf_num_beams_4(tiny_model, make_llm) -> None:
    path = tiny_model("llama")
    llm = make_llm("llama")
    model, tok = hf_model(path)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        hf = model.generate(ids, max_new_tokens=10, num_beams=4, num_return_sequences=4,
                            do_sample=False, length_penalty=1.0)
        ours = llm.beam_search(prompt, BeamSearchParams(beam_width=4, max_tokens=10,
                                                        ignore_eos=True))[0]
        assert [o.token_ids for o in ours.outputs] == [s[ids.shape[1]:].tolist() for s in hf]


def _peak_blocks(llm, prompts, params) -> int:
    peak = 0
    step = llm.engine.step

    def counting_step():
        nonlocal peak
        outs = step()
        peak = max(peak, llm.engine.kv.pool.num_usable_blocks - llm.engine.kv.num_free_blocks())
        return outs

    llm.engine.step = counting_step
    try:
        llm.generate(prompts, params)
    finally:
        llm.engine.step = step
    return peak


def test_n_children_share_prompt_blocks_and_free_them(make_llm) -> None:
    llm = make_llm(enable_prefix_caching=False, block_size=16)
    prompt = "a long shared prompt " * 12  # several full blocks
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=4, ignore_eos=True)
    shared = _peak_blocks(llm, [prompt], params.clone(n=4))
    separate = _peak_blocks(llm, [prompt] * 4, params)
    assert shared < separate
    num_prompt_blocks = len(llm.tokenizer.encode(prompt)) // 16
    assert separate - shared >= 3 * num_prompt_blocks  # only one copy of the full blocks
    assert llm.engine.kv.num_free_blocks() == llm.engine.kv.pool.num_usable_blocks


def test_best_of_returns_the_most_likely_candidates(make_llm) -> None:
    llm = make_llm()
    out = llm.generate("Once", SamplingParams(n=2, best_of=5, temperature=3.0, seed=11,
                                              max_tokens=6, ignore_eos=True))[0]
    assert len(out.outputs) == 2 and [o.index for o in out.outputs] == [0, 1]
    assert all(o.logprobs is None for o in out.outputs)  # not asked for: not returned
    every = llm.generate("Once", SamplingParams(n=5, temperature=3.0, seed=11, max_tokens=6,
                                                ignore_eos=True, logprobs=0))[0]
    ranked = sorted(every.outputs, key=lambda o: o.cumulative_logprob, reverse=True)
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ranked[:2]]


def test_repetition_detection_stops_a_loop(make_llm) -> None:
    llm = make_llm()
    # A bias forces a 1-token loop: the generation repeats token 42 and must be stopped.
    params = SamplingParams(temperature=0, max_tokens=40, logit_bias={42: 100.0},
                            repetition_detection={"max_pattern_size": 4, "min_count": 5})
    out = llm.generate("loop", params)[0].outputs[0]
    assert out.token_ids == [42] * 5
    assert out.finish_reason == "stop" and out.stop_reason == REPETITION_STOP_REASON


def test_logit_bias_allowed_ids_bad_words_min_tokens(make_llm) -> None:
    llm = make_llm()
    allowed = llm.generate("x", SamplingParams(temperature=2.0, seed=1, max_tokens=20,
                                               allowed_token_ids=[10, 11, 12],
                                               ignore_eos=True))[0].outputs[0]
    assert set(allowed.token_ids) <= {10, 11, 12}
    free = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12,
                                                   ignore_eos=True))[0].outputs[0]
    word = llm.tokenizer.decode([free.token_ids[0]])
    banned = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12,
                                                     ignore_eos=True,
                                                     bad_words=[word]))[0].outputs[0]
    assert free.token_ids[0] not in banned.token_ids
    eos = min(llm.engine.info.eos_token_ids)
    forced = SamplingParams(temperature=0, max_tokens=10, min_tokens=6, logit_bias={eos: 100.0})
    out = llm.generate("y", forced)[0].outputs[0]
    assert len(out.token_ids) == 7 and out.token_ids[-1] == eos and eos not in out.token_ids[:6]
    assert out.finish_reason == "stop"


def test_penalties_change_greedy_output_and_reduce_repeats(make_llm) -> None:
    llm = make_llm()
    plain = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=30,
                                                    ignore_eos=True))[0].outputs[0].token_ids
    pen = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                  frequency_penalty=2.0, presence_penalty=2.0,
                                                  repetition_penalty=1.5))[0].outputs[0].token_ids
    assert pen != plain
    assert len(set(pen)) >= len(set(plain))


def test_truncate_prompt_tokens_keeps_the_tail(make_llm) -> None:
    llm = make_llm()
    ids = llm.tokenizer.encode("one two three four five six seven eight nine ten")
    out = llm.generate(ids, SamplingParams(max_tokens=2, truncate_prompt_tokens=4))[0]
    assert out.prompt_token_ids == ids[-4:]


def test_generation_config_defaults_apply_unless_overridden(make_llm) -> None:
    llm = make_llm("qwen3")  # its generation_config.json sets temperature/top_p/top_k
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.7, 0.9, 20)
    plain = make_llm("qwen3", generation_config="fornax").get_default_sampling_params()
    assert plain.temperature == 1.0 and plain.top_k == -1
    assert np.isfinite(defaults.temperature)
