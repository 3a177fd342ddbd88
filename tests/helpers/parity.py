"""Test helper: the prompts and HF greedy reference that the HF-parity tests (CPU and GPU) share."""

from __future__ import annotations

from typing import Any

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


def hf_greedy(model: Any, tokenizer: Any, prompt: str, max_tokens: int) -> tuple[list[int], list]:
    """transformers' greedy continuation (EOS an ordinary token, like ignore_eos) on the model's
    device: (token ids, the scores of each step)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    model.generation_config.eos_token_id = None
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [s[0] for s in out.scores]
