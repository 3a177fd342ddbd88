"""cpu_paged attention (C kernel over the paged cache) against the torch_ref reference."""

from __future__ import annotations

import pytest
import torch

from fornax.perf.cpu_attention import paged_step
from fornax.runtime.attention.backend import make_attention_backend
from fornax.runtime.attention.cpu_paged import CpuPagedBackend
from fornax.runtime.attention.torch_ref import TorchRefBackend
from fornax.runtime.kernels.build import load_paged_decode, load_paged_prefill
from helpers.bench import run_bench
from helpers.native import cpu_lacks, no_compiler, require_kernel

pytestmark = no_compiler


def test_the_decode_kernel_builds_where_a_compiler_exists():
    require_kernel(load_paged_decode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16),    # SmolLM2-135M: grouped-query, the bf16 fast path
    (8, 8, 32, 16),    # multi-head, head_dim not a multiple of 32 (portable path)
    (16, 1, 128, 32),  # multi-query, bigger blocks
    (4, 2, 80, 16),    # head_dim 80
    (6, 2, 128, 16),   # head_dim 128, a group of 3 over register tiles of 2 query heads
    (12, 2, 64, 8),    # blocks of 8: score chunks stop at each block's end
    (8, 8, 96, 16),    # head_dim 96: three 32-wide chunks, two query heads per value sweep
    (8, 2, 256, 5),    # head_dim 256 and an odd block size: value pairs span two blocks
    # blocks over the portable path's 128-position tile (--block-size 256 was refused by every
    # decode step: each request failed): a block in two tiles, and one in a tile and a part
    (4, 2, 64, 256),
    (8, 8, 40, 160),
])
def test_matches_torch_ref_on_mixed_batches(dtype, heads, kv_heads, head_dim, block_size):
    torch.manual_seed(0)
    # Decodes with short and long contexts (one of a single token), a fresh prefill, and a
    # chunked prefill continuing from cached context, all in one step.
    q_lens, ctx_lens = [1, 1, 7, 1, 5, 1], [0, 37, 0, 300, 20, 15]
    common, num_blocks = paged_step(q_lens, ctx_lens, block_size, seed=heads)
    kw = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
              dtype=dtype, device=torch.device("cpu"))
    ref, fast = TorchRefBackend(**kw), CpuPagedBackend(**kw)
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim).to(dtype)
    tokens = common.num_actual_tokens
    q = torch.randn(tokens, heads, head_dim).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim).to(dtype)
    cache_ref, cache_fast = cache.clone(), cache.clone()
    expected = ref.forward(q, k, v, cache_ref, ref.build_metadata(common))
    got = fast.forward(q, k, v, cache_fast, fast.build_metadata(common))
    assert torch.equal(cache_ref, cache_fast)  # both wrote the new K/V to the same slots
    err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_all_decode_batch_writes_in_place():
    """The common pure-decode step skips the gather/scatter of q; results must still match."""
    q_lens, ctx_lens = [1] * 12, list(range(3, 600, 50))
    common, num_blocks = paged_step(q_lens, ctx_lens, 16, seed=1)
    kw = dict(num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16,
              device=torch.device("cpu"))
    ref, fast = TorchRefBackend(**kw), CpuPagedBackend(**kw)
    meta = fast.build_metadata(common)
    assert meta.all_decode and meta.decode_token_index is None
    cache = torch.randn(num_blocks, 2, 16, 3, 64).to(torch.bfloat16)
    q, k, v = (torch.randn(12, h, 64).to(torch.bfloat16) for h in (9, 3, 3))
    expected = ref.forward(q, k, v, cache.clone(), ref.build_metadata(common))
    got = fast.forward(q, k, v, cache.clone(), meta)
    assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2


def test_auto_picks_cpu_paged_and_falls_back(monkeypatch):
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
              device=torch.device("cpu"))
    assert isinstance(make_attention_backend("auto", **kw), CpuPagedBackend)
    # Shapes the kernel cannot take (group of 64 query heads per kv head) fall back to torch_ref.
    wide = dict(kw, num_heads=64, num_kv_heads=1)
    backend = make_attention_backend("auto", **wide)
    assert type(backend) is TorchRefBackend
    with pytest.raises(RuntimeError, match="float16"):
        CpuPagedBackend(**dict(kw, dtype=torch.float16))
    monkeypatch.setenv("FORNAX_NATIVE_KERNELS", "0")
    load_paged_decode.cache_clear()
    try:
        assert type(make_attention_backend("auto", **kw)) is TorchRefBackend
    finally:
        monkeypatch.delenv("FORNAX_NATIVE_KERNELS")
        load_paged_decode.cache_clear()


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16),    # SmolLM2-135M
    (16, 1, 128, 32),  # multi-query, head_dim 128, bigger blocks
    (4, 4, 96, 16),    # multi-head, head_dim 96 (a 64 + 32 split of the value product)
])
@cpu_lacks("avx512_bf16")
def test_prefill_kernel_matches_torch_ref_on_long_and_chunked_prompts(heads, kv_heads, head_dim,
                                                                      block_size):
    """Prompts spanning several query tiles, fresh and continuing cached context, with decodes."""
    require_kernel(load_paged_prefill)
    torch.manual_seed(1)
    q_lens, ctx_lens = [150, 1, 65, 2, 64, 1], [0, 90, 203, 31, 0, 7]
    common, num_blocks = paged_step(q_lens, ctx_lens, block_size, seed=7)
    kw = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
              dtype=torch.bfloat16, device=torch.device("cpu"))
    ref, fast = TorchRefBackend(**kw), CpuPagedBackend(**kw)
    meta = fast.build_metadata(common)
    assert meta.prefill_q_lens.tolist() == [150, 65, 2, 64] and not meta.prefills
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim).to(torch.bfloat16)
    tokens = common.num_actual_tokens
    # q as a strided view of a wider projection, like the model's fused qkv output
    qkv = torch.randn(tokens, heads + 2, head_dim).to(torch.bfloat16)
    q = qkv[:, :heads]
    k = torch.randn(tokens, kv_heads, head_dim).to(torch.bfloat16)
    v = torch.randn(tokens, kv_heads, head_dim).to(torch.bfloat16)
    expected = ref.forward(q, k, v, cache.clone(), ref.build_metadata(common)).float()
    got = fast.forward(q, k, v, cache.clone(), meta).float()
    assert torch.isfinite(got).all()
    for start, end in zip(common.query_start_loc_np[:-1], common.query_start_loc_np[1:]):
        err = ((got[start:end] - expected[start:end]).norm()
               / expected[start:end].norm()).item()
        assert err < 1e-2, (start, end, err)


def test_bench_cpu_attention_writes_a_valid_record(tmp_path):
    rec = run_bench(tmp_path, "cpu-attention", "--batch-sizes", "1,3", "--context-len", "40",
                    "--prompt-lens", "20", "--chunk", "9:17", "--num-layers", "2", "--rounds", "1",
                    "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "64")
    m = rec["metrics"]
    for case in ("decode_b1", "decode_b3", "prefill_q20", "chunk_q9_ctx17"):
        assert m[f"torch_ref_ms_{case}"] > 0 and m[f"cpu_paged_ms_{case}"] > 0
        assert m[f"speedup_{case}"] == pytest.approx(
            m[f"torch_ref_ms_{case}"] / m[f"cpu_paged_ms_{case}"])
        assert len(rec["details"]["rounds_ms"][case]["cpu_paged"]) == 1
