"""The packaged SmolLM2 through fornax's engine: greedy parity with HF and the default `LLM()`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fornax.runtime import LLM, SamplingParams
from fornax.runtime.loaders.gguf_loader import prepare_gguf

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for learning Python.",
    "Who wrote Romeo and Juliet?",
    "Explain what a CPU does in one sentence.",
]
ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, max_num_seqs=8)


@pytest.fixture(scope="module")
def default_llm(packaged_gguf):
    return LLM(**ENGINE_ARGS)  # no model: the packaged GGUF, prepared once into the cache


def test_greedy_chat_matches_transformers_token_for_token(packaged_gguf, default_llm) -> None:
    # The prepared folder's weights are bit-identical to transformers' own GGUF load
    # (tests/engine/test_gguf_smollm2.py), so HF on that folder is HF on the GGUF.
    folder = prepare_gguf(packaged_gguf)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0, max_tokens=48)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = default_llm.chat(convs, params)
    for q, out in zip(QUESTIONS, outs):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=2,
                              pad_token_id=2)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref, q
    assert "Paris" in outs[0].outputs[0].text


def test_hf_folder_of_the_same_model_gives_identical_outputs(packaged_gguf, default_llm) -> None:
    folder_llm = LLM(str(prepare_gguf(packaged_gguf)), **ENGINE_ARGS)
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=24)
    a = default_llm.generate(QUESTIONS[:4], params)
    b = folder_llm.generate(QUESTIONS[:4], params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
