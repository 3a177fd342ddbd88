"""Compare paged KV caches written by two forwards of one step (compiled vs eager, graph vs eager).

A compiled forward fuses the K/V projection and rotary differently from eager, so the K/V it
writes can differ from eager's by a few ulps; a strict `assert_close` on the whole cache then
fails although nothing is wrong. What must hold exactly is that a step writes only the slots it
was given: every other slot (the rest of each real block; padding rows write only the null
block 0) stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fornax.runtime.attention.backend import CommonAttentionMetadata

# bf16 keeps 8 significant bits: one ulp is 2^-7 relative (0.8%); compiled and eager differ by a
# few ulps on rounded intermediate sums, so written slots agree within 4 ulps relative plus an
# absolute term for values near zero.
WRITTEN_RTOL = {torch.bfloat16: 4 * 2.0**-7, torch.float16: 4 * 2.0**-10, torch.float32: 1e-4}
WRITTEN_ATOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def written_mask(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size] True at the flat slots a step wrote (layout of
    AttentionBackend.kv_cache_shape: [num_blocks, 2, block_size, kv_heads, head_dim])."""
    num_blocks, _, block_size = cache.shape[:3]
    mask = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=cache.device)
    mask[slots.to(cache.device).long()] = True
    return mask.view(num_blocks, block_size)


def assert_step_writes_match(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor],
                             slots: torch.Tensor, *, skip_null_block: bool = True) -> None:
    """Per layer: slots outside `slots` identical; slots in `slots` close within WRITTEN_RTOL/
    WRITTEN_ATOL of the cache dtype. Block 0 (the null block padding rows write into) is left
    out when `skip_null_block`."""
    start = 1 if skip_null_block else 0
    for layer, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        mask = written_mask(a, slots)[start:]
        a, b = a[start:].transpose(1, 2), b[start:].transpose(1, 2)  # [blocks, slot, 2, h, d]
        untouched = ~mask
        if not torch.equal(a[untouched], b[untouched]):
            diff = (a[untouched] != b[untouched]).sum().item()
            raise AssertionError(f"layer {layer}: {diff} values changed outside the step's "
                                 "slots (padding or a wrong slot mapping wrote somewhere real)")
        torch.testing.assert_close(
            a[mask].float(), b[mask].float(), rtol=WRITTEN_RTOL[a.dtype],
            atol=WRITTEN_ATOL[a.dtype], msg=lambda m, layer=layer: f"layer {layer}: {m}")


def decode_batch(runner: Any, n: int, seed: int) -> CommonAttentionMetadata:
    """n decode rows with random contexts (each in its own blocks from block 1 on); writes their
    inputs into the runner's device buffers."""
    gen = np.random.default_rng(seed)
    dev = runner.device
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
    runner.input_ids[:n] = torch.from_numpy(gen.integers(3, 400, size=n)).to(dev)
    runner.positions[:n] = torch.from_numpy(positions).to(dev)
    runner.slot_mapping[:n] = torch.from_numpy(slots).to(dev)
    return CommonAttentionMetadata(
        query_start_loc_np=np.arange(n + 1, dtype=np.int32), seq_lens_np=seq_lens,
        block_table_np=table,
        slot_mapping=runner.slot_mapping[:n], num_reqs=n, num_actual_tokens=n, max_query_len=1,
        max_seq_len=int(seq_lens.max()), block_size=bs)
