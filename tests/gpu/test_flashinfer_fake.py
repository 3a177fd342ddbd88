"""FlashInferBackend's planning and CUDA-graph buffers on CPU, over a stand-in for flashinfer
that follows its documented paged-KV contract (tests/helpers/fake_flashinfer.py): the engine's
tokens must equal torch_ref's, eager and through the bucket-replay path."""

from __future__ import annotations

import pytest

from fornax.runtime import SamplingParams
from fornax.runtime.attention import flashinfer_backend
from helpers import fake_flashinfer
from helpers.fake_graphs import CpuReplayRunner

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog again and again", "1 2 3",
           "x", "def f(a):\n    return a + 1", "Once upon a time"]
LENGTHS = (12, 7, 3, 9, 5, 10)  # the decode batch shrinks as requests finish


@pytest.fixture
def fake_fi(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "flashinfer", fake_flashinfer)
    monkeypatch.setattr(flashinfer_backend, "check_supported", lambda *args: None)
    monkeypatch.setattr(flashinfer_backend, "WORKSPACE_BYTES", 1024)


def _params():
    return [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in LENGTHS]


def _reference(make_llm) -> list[list[int]]:
    ref = make_llm("llama", enforce_eager=True, attention_backend="torch_ref",
                   max_num_batched_tokens=32)
    return [o.outputs[0].token_ids for o in ref.generate(PROMPTS, _params())]


def test_flashinfer_plans_give_torch_ref_tokens(fake_fi, make_llm) -> None:
    # a 32-token budget chunks the longer prompts: prefill chunks over cached context, mixed steps
    llm = make_llm("llama", enforce_eager=True, attention_backend="flashinfer",
                   max_num_batched_tokens=32)
    backend = llm.engine.runner.backend
    assert backend.name == "flashinfer" and backend.tensor_core_decode  # 4 heads over 2
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())]
    assert backend.prefill_wrapper.num_plans > 0 and backend.decode_wrapper.num_plans > 0
    assert ours == _reference(make_llm)


def test_graph_buckets_read_fixed_buffers_and_give_torch_ref_tokens(fake_fi, make_llm) -> None:
    llm = make_llm("llama", enforce_eager=True, attention_backend="flashinfer",
                   max_num_batched_tokens=32)
    runner = llm.engine.runner
    graphs = CpuReplayRunner(runner.forward_fn, runner.backend, [1, 2, 4, 8], runner.input_ids,
                             runner.positions, runner.slot_mapping, runner.kv_caches,
                             runner.max_blocks_per_req, runner.block_size, num_warmups=1)
    graphs.capture()
    runner.graph_runner = graphs
    backend = runner.backend
    assert sorted(backend.graph_wrappers) == [1, 2, 4, 8]
    indices_buffers = {id(w.bufs[1]) for w in backend.graph_wrappers.values()}
    assert len(indices_buffers) == 1  # one shared page-index buffer for every bucket
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())]
    assert graphs.num_replays >= max(LENGTHS) - 3  # pure-decode steps (chunked prefill mixes some)
    assert sum(w.num_plans for w in backend.graph_wrappers.values()) > graphs.num_replays
    assert ours == _reference(make_llm)
