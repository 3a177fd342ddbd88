"""CUDA graphs: replay equals the eager forward's logits for every bucket; compile holds fullgraph
across the FlashInfer custom op (GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fornax.runtime import LLM, SamplingParams
from fornax.runtime.attention.backend import CommonAttentionMetadata

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
    del llm
    torch.cuda.empty_cache()


def decode_batch(runner, n: int, seed: int) -> CommonAttentionMetadata:
    """n decode rows with random contexts; writes their inputs into the runner's buffers."""
    gen = np.random.default_rng(seed)
    bs = runner.block_size
    seq_lens = gen.integers(1, 200, size=n).astype(np.int32)
    table = np.zeros((n, runner.max_blocks_per_req), dtype=np.int32)
    next_block = 1
    for row, length in enumerate(seq_lens):
        count = -(-int(length) // bs)
        table[row, :count] = np.arange(next_block, next_block + count)
        next_block += count
    positions = seq_lens.astype(np.int64) - 1
    slots = table[np.arange(n), positions // bs].astype(np.int64) * bs + positions % bs
    runner.input_ids[:n] = torch.from_numpy(gen.integers(3, 400, size=n)).cuda()
    runner.positions[:n] = torch.from_numpy(positions).cuda()
    runner.slot_mapping[:n] = torch.from_numpy(slots).cuda()
    return CommonAttentionMetadata(
        query_start_loc_np=np.arange(n + 1, dtype=np.int32), seq_lens_np=seq_lens,
        block_table=torch.from_numpy(table).cuda(), block_table_np=table,
        slot_mapping=runner.slot_mapping[:n], num_reqs=n, num_actual_tokens=n, max_query_len=1,
        max_seq_len=int(seq_lens.max()), block_size=bs)


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
        for ours, theirs in zip(runner.kv_caches, eager_caches):  # padding wrote nowhere real
            torch.testing.assert_close(ours[1:], theirs[1:], rtol=2e-2, atol=1e-2)
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
    eager = LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=512,
                max_num_seqs=MAX_SEQS, num_gpu_blocks_override=512, enforce_eager=True)
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
    torch.testing.assert_close(cache_compiled, cache_eager)
