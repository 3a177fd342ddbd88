"""Engine vs HF transformers on the GPU: tiny Llama and Qwen3, logprob-close in bf16 (GPU)."""

from __future__ import annotations

import pytest
import torch

from fornax.runtime import LLM, SamplingParams
from helpers.parity import PROMPTS as ALL_PROMPTS
from helpers.parity import hf_greedy

pytestmark = pytest.mark.gpu

PROMPTS = ALL_PROMPTS[:6]
MAX_TOKENS = 24
TOP_K = 5


def assert_logprob_close(path, llm: LLM, label: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logprobs=TOP_K)
    outputs = llm.generate(PROMPTS, params)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    tok = AutoTokenizer.from_pretrained(path)
    for prompt, out in zip(PROMPTS, outputs):
        expected, scores = hf_greedy(hf, tok, prompt, MAX_TOKENS)
        ours = out.outputs[0].token_ids
        assert len(ours) == MAX_TOKENS
        for step, (a, b) in enumerate(zip(ours, expected)):
            # our chosen token's logprob agrees with HF's for the same prefix
            hf_lp = torch.log_softmax(scores[step].float(), -1)
            assert abs(out.outputs[0].logprobs[step][a].logprob - float(hf_lp[a])) < 0.5, (
                f"{label}: {prompt!r} step {step}")
            if a != b:  # first divergence: each side's choice is in the other's top-k
                assert b in set(out.outputs[0].logprobs[step]), f"{label}: {prompt!r}"
                assert a in set(hf_lp.topk(TOP_K).indices.tolist()), f"{label}: {prompt!r}"
                break


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_models_on_gpu_are_logprob_close_to_transformers(arch, tiny_model) -> None:
    """The CPU suite's tiny checkpoints (head dims 16/32: torch_ref, compiled, no graphs)."""
    path = tiny_model(arch)
    with LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=512,
             num_gpu_blocks_override=256) as llm:  # closed at once: the next case profiles
        assert llm.engine.runner.compiled          # a clean card
        assert_logprob_close(path, llm, f"{arch} tiny")


@pytest.mark.flashinfer
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gpu_shaped_models_with_flashinfer_and_graphs_match_transformers(
        arch, tiny_model, tmp_path_factory) -> None:
    """head_dim 128 variants: FlashInfer attention, torch.compile and CUDA graphs together."""
    from helpers.gpu_models import gpu_shaped_checkpoint

    path = gpu_shaped_checkpoint(tiny_model(arch), arch, tmp_path_factory.mktemp(f"gpu-{arch}"))
    # a capped cache (an uncapped one takes ~70 GB of an H100 for a model this small)
    with LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=16,
             num_gpu_blocks_override=512) as llm:
        runner = llm.engine.runner
        assert runner.backend.name == "flashinfer" and runner.graph_runner is not None
        assert_logprob_close(path, llm, f"{arch} gpu-shaped")
        assert runner.graph_runner.num_replays > 0
