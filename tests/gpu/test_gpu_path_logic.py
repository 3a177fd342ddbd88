"""The GPU path's host-side logic, on CPU: page layout, bucket padding, capture order, KV budget,
and the paged-attention custom op under torch.compile(fullgraph=True)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fornax.graphs.cuda_graphs import (
    NULL_SLOT,
    CudaGraphRunner,
    capture_order,
    dummy_decode_metadata,
    pad_decode_metadata,
)
from fornax.runtime.attention.backend import CommonAttentionMetadata, make_attention_backend
from fornax.runtime.attention.flashinfer_backend import (
    check_supported,
    decode_uses_tensor_cores,
    paged_kv_layout,
)
from fornax.runtime.attention.paged_attention_op import register_impl, unregister_impl, write_kv
from fornax.runtime.worker.gpu_memory import MemoryProfile, kv_budget_bytes
from helpers.fake_graphs import CpuReplayRunner


def test_paged_kv_layout_lists_each_requests_pages() -> None:
    table = np.array([[5, 9, 11, 0], [3, 0, 0, 0], [7, 8, 0, 0]], dtype=np.int32)
    layout = paged_kv_layout(table, np.array([33, 16, 17], dtype=np.int32), block_size=16)
    assert layout.indptr.tolist() == [0, 3, 4, 6]
    assert layout.indices.tolist() == [5, 9, 11, 3, 7, 8]
    assert layout.last_page_len.tolist() == [1, 16, 1]  # always in [1, block_size]
    assert layout.indptr.dtype == layout.indices.dtype == layout.last_page_len.dtype == np.int32
    with pytest.raises(ValueError):
        paged_kv_layout(table, np.array([16 * 5, 1, 1], dtype=np.int32), block_size=16)


def _decode_common(seq_lens: list[int], table: np.ndarray) -> CommonAttentionMetadata:
    n = len(seq_lens)
    return CommonAttentionMetadata(
        query_start_loc_np=np.arange(n + 1, dtype=np.int32),
        seq_lens_np=np.array(seq_lens, dtype=np.int32), block_table_np=table,
        slot_mapping=torch.arange(n), num_reqs=n, num_actual_tokens=n,
        max_query_len=1, max_seq_len=max(seq_lens), block_size=16)


def test_padding_rows_are_one_token_requests_in_the_null_block() -> None:
    table = np.array([[4, 6, 0], [2, 0, 0], [9, 10, 12]], dtype=np.int32)
    slots = torch.zeros(8, dtype=torch.int64)
    padded = pad_decode_metadata(_decode_common([20, 3, 40], table), 4, slots)
    assert padded.num_reqs == padded.num_actual_tokens == 4
    assert padded.query_start_loc_np.tolist() == [0, 1, 2, 3, 4]
    assert padded.seq_lens_np.tolist() == [20, 3, 40, 1]
    assert padded.block_table_np[3].tolist() == [0, 0, 0]  # the null block only
    assert padded.slot_mapping.shape[0] == 4
    layout = paged_kv_layout(padded.block_table_np, padded.seq_lens_np, 16)
    assert layout.indices.tolist() == [4, 6, 2, 9, 10, 12, 0]
    assert layout.last_page_len.tolist() == [4, 3, 8, 1]
    with pytest.raises(ValueError):
        pad_decode_metadata(_decode_common([1, 1, 1], table), 2, slots)  # does not fit
    prefill = _decode_common([5, 1, 1], table)
    prefill.max_query_len = 5
    with pytest.raises(ValueError):
        pad_decode_metadata(prefill, 4, slots)


def test_dummy_decode_metadata_writes_only_the_null_slot() -> None:
    slots = torch.full((16,), 99, dtype=torch.int64)
    slots[:8].fill_(NULL_SLOT)
    common = dummy_decode_metadata(8, max_blocks_per_req=4, block_size=16, slot_mapping=slots)
    assert common.slot_mapping.tolist() == [NULL_SLOT] * 8
    assert common.block_table_np.shape == (8, 4) and not common.block_table_np.any()
    assert common.seq_lens_np.tolist() == [1] * 8


def test_capture_order_is_largest_first_without_duplicates() -> None:
    assert capture_order([1, 2, 4, 8, 16, 32, 4]) == [32, 16, 8, 4, 2, 1]


def test_graph_runner_refuses_backends_that_cannot_be_captured() -> None:
    backend = make_attention_backend("torch_ref", num_heads=4, num_kv_heads=2, head_dim=16,
                                     block_size=16, dtype=torch.float32,
                                     device=torch.device("cpu"))
    assert not backend.supports_cuda_graphs
    buf = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError):
        CudaGraphRunner(lambda *a: None, backend, [1, 2], buf, buf, buf, [], 4, 16)


def test_flashinfer_support_checks_and_auto_fallback() -> None:
    with pytest.raises(ValueError):
        check_supported(128, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError):
        check_supported(16, torch.bfloat16, torch.device("cuda"))  # tiny head dims: torch_ref
    with pytest.raises(ValueError):
        check_supported(128, torch.float32, torch.device("cuda"))
    check_supported(128, torch.bfloat16, torch.device("cuda"))
    assert decode_uses_tensor_cores(32, 8) and not decode_uses_tensor_cores(16, 16)
    backend = make_attention_backend("auto", num_heads=4, num_kv_heads=2, head_dim=16,
                                     block_size=16, dtype=torch.float32,
                                     device=torch.device("cpu"))
    assert backend.name != "flashinfer"


def test_kv_budget_arithmetic() -> None:
    gib = 1024**3
    profile = MemoryProfile(total=80 * gib, free_after=60 * gib, torch_peak=17 * gib,
                            torch_reserved=18 * gib)
    assert profile.non_torch == 2 * gib  # 80 - 60 - 18
    assert kv_budget_bytes(profile, 0.9, graph_reserve=gib) == int(72 * gib) - 17 * gib - 3 * gib
    assert kv_budget_bytes(profile, 0.2) < 0  # the model does not fit: the caller refuses


class _CausalCpuImpl:
    """A CPU stand-in for FlashInfer behind the op: one request, causal, writes K/V."""

    def __init__(self, num_heads: int, num_kv_heads: int) -> None:
        self.gqa = num_heads != num_kv_heads

    def attend(self, q, k, v, kv_cache, slot_mapping):
        write_kv(kv_cache, k, v, slot_mapping)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True,
                                             enable_gqa=self.gqa)
        return out.transpose(0, 1).contiguous()


def test_custom_op_keeps_fullgraph_compile_and_writes_the_cache() -> None:
    torch.manual_seed(0)
    heads, kv_heads, dim, tokens, block = 4, 2, 8, 5, 4
    impl = _CausalCpuImpl(heads, kv_heads)  # the registry holds it weakly
    handle = register_impl(impl)
    try:
        proj = torch.nn.Linear(dim * heads, dim * (heads + 2 * kv_heads))
        out_proj = torch.nn.Linear(dim * heads, dim * heads)

        def layer(x, kv_cache, slots):
            qkv = proj(x)
            q, k, v = qkv.split([dim * heads, dim * kv_heads, dim * kv_heads], -1)
            attn = torch.ops.fornax.paged_attention(
                q.view(-1, heads, dim), k.view(-1, kv_heads, dim), v.view(-1, kv_heads, dim),
                kv_cache, slots, handle)
            return out_proj(attn.reshape(-1, heads * dim)) + x

        x = torch.randn(tokens, dim * heads)
        slots = torch.tensor([4, 5, 6, 7, 8])  # blocks 1 and 2 (block 0 is the null block)
        eager_cache = torch.zeros(3, 2, block, kv_heads, dim)
        compiled_cache = torch.zeros_like(eager_cache)
        with torch.no_grad():
            expected = layer(x, eager_cache, slots)
            compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
            got = compiled(x, compiled_cache, slots)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(compiled_cache, eager_cache)  # the mutation survives compile
        assert eager_cache[0].abs().sum() == 0 and eager_cache[1].abs().sum() > 0
        k = proj(x).split([dim * heads, dim * kv_heads, dim * kv_heads], -1)[1]
        torch.testing.assert_close(eager_cache[2, 0, 0], k[4].view(kv_heads, dim).detach())
    finally:
        unregister_impl(handle)


def test_custom_op_passes_opcheck() -> None:
    heads, kv_heads, dim = 2, 1, 8
    impl = _CausalCpuImpl(heads, kv_heads)
    handle = register_impl(impl)
    try:
        args = (torch.randn(3, heads, dim), torch.randn(3, kv_heads, dim),
                torch.randn(3, kv_heads, dim), torch.zeros(2, 2, 4, kv_heads, dim),
                torch.tensor([4, 5, 6]), handle)
        torch.library.opcheck(torch.ops.fornax.paged_attention.default, args,
                              test_utils=("test_schema", "test_faketensor"))
    finally:
        unregister_impl(handle)


def _make_replayable(backend) -> None:
    """torch_ref as a 'graph' backend: its graph metadata is ordinary metadata, kept for the
    stand-in replay below."""

    def build_graph_metadata(common, bucket):
        assert common.num_reqs == bucket and common.max_query_len == 1
        backend.last_graph_meta = backend.build_metadata(common)
        return backend.last_graph_meta

    backend.supports_cuda_graphs = True
    backend.build_graph_metadata = build_graph_metadata


class _CpuGraphRunner(CpuReplayRunner):
    """Replays with the metadata the backend built last (padded rows included)."""

    def replay_meta(self, captured):
        return self.backend.last_graph_meta


def test_runner_replays_padded_decode_buckets_with_eager_tokens(make_llm) -> None:
    """The ModelRunner <-> CudaGraphRunner protocol on CPU: pure-decode steps go through the
    bucket path (padding rows in the null block), prefills do not, tokens equal eager's."""
    from fornax.runtime import SamplingParams

    prompts = ["Hello world", "The quick brown fox", "1 2 3", "x", "def f(a):"]
    # different lengths: the decode batch shrinks 5 -> 1 (buckets 8, 4, 4, 2, 1)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
              for m in (12, 7, 3, 9, 5)]
    eager = make_llm("llama", enforce_eager=True, attention_backend="torch_ref")
    graphed = make_llm("llama", enforce_eager=True, attention_backend="torch_ref")
    runner = graphed.engine.runner
    backend = runner.backend
    _make_replayable(backend)
    graphs = _CpuGraphRunner(runner.forward_fn, backend, [1, 2, 4, 8], runner.input_ids,
                             runner.positions, runner.slot_mapping, runner.kv_caches,
                             runner.max_blocks_per_req, runner.block_size, num_warmups=1)
    graphs.capture()
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    runner.graph_runner = graphs
    ours = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
    assert graphs.num_replays == 11  # every decode step: the first token comes from prefill
    assert ours == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]


def test_op_registry_does_not_keep_backends_alive() -> None:
    import gc

    impl = _CausalCpuImpl(2, 1)
    handle = register_impl(impl)
    args = (torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8),
            torch.zeros(2, 2, 4, 1, 8), torch.tensor([4, 5]), handle)
    assert torch.ops.fornax.paged_attention(*args).shape == (2, 2, 8)
    del impl
    gc.collect()
    with pytest.raises(RuntimeError, match="no backend registered"):
        torch.ops.fornax.paged_attention(*args)
