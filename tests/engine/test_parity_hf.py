"""Parity with HF transformers on tiny checkpoints: exact greedy tokens (fp32), close in bf16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fornax.runtime import SamplingParams

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog and keeps running far away",
    "def add(a, b):\n    return",
    "1 2 3 4 5 6 7 8 9",
    "a",
    "Once upon a time there was a little model that learned to count",
    "print('hi')",
    "The weather today is",
    "In the beginning",
]
ARCHS = ["llama", "llama-mha", "qwen2", "qwen3"]
MAX_TOKENS = 32


def hf_greedy(model, tokenizer, prompt: str) -> tuple[list[int], list[torch.Tensor]]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    model.generation_config.eos_token_id = None  # like ignore_eos: EOS is an ordinary token
    out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [s[0] for s in out.scores]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_float32_matches_transformers_token_for_token(arch, tiny_model, make_llm) -> None:
    path = tiny_model(arch)
    llm = make_llm(arch, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)  # one batch: continuous batching of 9 lengths
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    for prompt, out in zip(PROMPTS, outputs):
        expected, _ = hf_greedy(hf, tok, prompt)
        assert out.prompt_token_ids == tok(prompt).input_ids
        assert out.outputs[0].token_ids == expected, f"{arch}: {prompt!r}"
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bfloat16_is_logprob_close_to_transformers(arch, tiny_model, make_llm) -> None:
    path = tiny_model(arch)
    top_k = 5
    llm = make_llm(arch, dtype="bfloat16")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logprobs=top_k)
    outputs = llm.generate(PROMPTS, params)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(path)
    for prompt, out in zip(PROMPTS, outputs):
        expected, scores = hf_greedy(hf, tok, prompt)
        ours = out.outputs[0].token_ids
        for step, (a, b) in enumerate(zip(ours, expected)):
            if a == b:
                continue
            # First divergence: each side's choice must be among the other's top-k.
            our_top = set(out.outputs[0].logprobs[step])
            hf_top = set(scores[step].float().topk(top_k).indices.tolist())
            assert b in our_top and a in hf_top, f"{arch}: {prompt!r} diverged at {step}"
            break
