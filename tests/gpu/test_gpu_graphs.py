"""CUDA graphs: replay equals the eager forward's logits for every bucket; compile holds fullgraph
across the FlashInfer custom op (GPU)."""

from __future__ import annotations

import pytest
import torch

from fornax.runtime import LLM, SamplingParams
from helpers.kv_compare import assert_step_writes_match, decode_batch

pytestmark = [pytest.mark.gpu, pytest.mark.flashinfer]

MAX_SEQS = 40  # buckets 1, 2, 4, 8, 16, 32 (40 runs eagerly)


@pytest.fixture(scope="module")
def gpu_llama(tiny_model, tmp_path_factory):
    from helpers.gpu_models import gpu_shaped_checkpoint

    path = gpu_shaped_checkpoint(tiny_model("llama"), "llama",
                                 tmp_path_factory.mktemp("gpu-llama"))
    llm = LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=512,
              max_num_seqs=MAX_SEQS, num_gpu_blocks_override=512)
    yield llm
    llm.close()  # frees weights, cache and graphs now (del alone leaves reference cycles)


@torch.inference_mode()
def test_graph_replay_equals_eager_logits_for_every_bucket(gpu_llama) -> None:
    runner = gpu_llama.engine.runner
    graphs = runner.graph_runner
    assert runner.backend.name == "flashinfer" and graphs is not None
    assert graphs.sizes == [1, 2, 4, 8, 16, 32] and set(graphs.graphs) == set(graphs.sizes)
    for layer_cache in runner.kv_caches:  # a random context for every block
        layer_cache.copy_(torch.randn_like(layer_cache, dtype=torch.float32))
    sizes = sorted(set(graphs.sizes) | {3, 5, 31})  # exact buckets and padded batches
    for n in sizes:
        common = decode_batch(runner, n, seed=n)
        slots = runner.slot_mapping[:n].clone()
        ids, pos = runner.input_ids[:n].clone(), runner.positions[:n].clone()
        eager_caches = [c.clone() for c in runner.kv_caches]
        eager = runner.model.forward(ids, pos, eager_caches,
                                     runner.backend.build_metadata(common))
        eager_logits = runner.model.compute_logits(eager).float()
        assert graphs.can_replay(n, n)
        replayed = graphs.replay(common)
        logits = runner.model.compute_logits(replayed).float()
        torch.cuda.synchronize()
        err = float((logits - eager_logits).norm() / eager_logits.norm())
        assert err < 1e-2, f"batch {n} (bucket {graphs.bucket(n)}): relative error {err}"
        assert (logits.argmax(-1) == eager_logits.argmax(-1)).float().mean() > 0.9
        # padding wrote nowhere real (exact); the written slots agree within kv_compare's bounds
        assert_step_writes_match(runner.kv_caches, eager_caches, slots)
    assert not graphs.can_replay(MAX_SEQS, MAX_SEQS)  # past the largest bucket: eager
    assert not graphs.can_replay(9, 3)  # a prefill step never replays


def test_engine_steps_replay_graphs_and_match_eager_tokens(gpu_llama, tiny_model,
                                                           tmp_path_factory) -> None:
    from helpers.gpu_models import gpu_shaped_checkpoint

    prompts = [f"{i} apples and {i + 1} pears" for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    graphs = gpu_llama.engine.runner.graph_runner
    before = graphs.num_replays
    ours = [o.outputs[0].token_ids for o in gpu_llama.generate(prompts, params)]
    assert graphs.num_replays > before  # decode steps went through the graphs
    path = gpu_shaped_checkpoint(tiny_model("llama"), "llama",
                                 tmp_path_factory.mktemp("gpu-llama-eager"))
    with LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=512,
             max_num_seqs=MAX_SEQS, num_gpu_blocks_override=512, enforce_eager=True) as eager:
        assert eager.engine.runner.graph_runner is None
        theirs = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same >= len(prompts) - 1, f"{same}/{len(prompts)} greedy sequences agree"


@torch.inference_mode()
def test_whole_layer_compiles_fullgraph_through_the_custom_op(gpu_llama) -> None:
    runner = gpu_llama.engine.runner
    layer = runner.model.model.layers[0]
    n = 4
    common = decode_batch(runner, n, seed=7)
    x = torch.randn(n, runner.model.spec.hidden_size, device="cuda", dtype=torch.bfloat16)
    cache_eager = runner.kv_caches[0].clone()
    cache_compiled = runner.kv_caches[0].clone()
    pos = runner.positions[:n].clone()
    meta = runner.backend.build_metadata(common)
    expected = layer(pos, x, cache_eager, meta)
    compiled = torch.compile(layer.forward, fullgraph=True, dynamic=False)
    got = compiled(pos, x, cache_compiled, meta)
    torch.cuda.synchronize()
    assert float((got - expected).float().norm() / expected.float().norm()) < 1e-2
    assert_step_writes_match([cache_compiled], [cache_eager], runner.slot_mapping[:n],
                             skip_null_block=False)
