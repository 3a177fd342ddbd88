"""CUDA graphs of the decode forward, one per batch-size bucket: capture and replay (engine core).

Capture runs once at start-up, largest bucket first, every graph in one shared memory pool (a
smaller batch's activations fit inside the largest one's, so the pool costs about one graph).
Each bucket is run eagerly first (torch.compile specialises and Inductor finishes outside the
capture), then captured. A pure-decode step of `n` requests replays the smallest bucket `B >= n`:
the runner's persistent input buffers already hold the `n` real rows; rows `n..B` get token 0,
position 0 and slot 0, which lies in the reserved null block 0, so padding writes K/V nowhere that
a real request reads. The attention backend re-plans the bucket's fixed page-table buffers before
each replay (`build_graph_metadata`), outside the graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fornax.graphs.buckets import bucket_for
from fornax.runtime.attention.backend import AttentionBackend, CommonAttentionMetadata

logger = logging.getLogger(__name__)

NULL_SLOT = 0  # slot 0 of block 0: the block pool never hands block 0 to a request


def capture_order(sizes: list[int]) -> list[int]:
    """Largest first: the first capture sizes the shared pool, later ones reuse its memory."""
    return sorted(set(sizes), reverse=True)


def pad_decode_metadata(common: CommonAttentionMetadata, bucket: int,
                        slot_mapping: torch.Tensor) -> CommonAttentionMetadata:
    """A pure-decode batch of `num_reqs` rows as a batch of `bucket` rows: each padding row is a
    one-token request whose only page is the null block. `slot_mapping` is the static buffer
    (already padded) the captured graph reads; graph-capable backends plan from the host arrays."""
    n = common.num_reqs
    if n > bucket:
        raise ValueError(f"{n} requests do not fit a bucket of {bucket}")
    if common.max_query_len != 1 or common.num_actual_tokens != n:
        raise ValueError("only pure-decode batches (one new token per request) replay graphs")
    seq_lens = np.ones(bucket, dtype=np.int32)
    seq_lens[:n] = common.seq_lens_np
    table = np.zeros((bucket, common.block_table_np.shape[1]), dtype=np.int32)
    table[:n] = common.block_table_np
    return replace(common, query_start_loc_np=np.arange(bucket + 1, dtype=np.int32),
                   seq_lens_np=seq_lens, block_table_np=table,
                   slot_mapping=slot_mapping[:bucket], num_reqs=bucket,
                   num_actual_tokens=bucket, max_query_len=1,
                   max_seq_len=max(int(seq_lens.max()), 1))


def dummy_decode_metadata(bucket: int, max_blocks_per_req: int, block_size: int,
                          slot_mapping: torch.Tensor) -> CommonAttentionMetadata:
    """`bucket` one-token requests living entirely in the null block (capture and warm-up)."""
    table = np.zeros((bucket, max_blocks_per_req), dtype=np.int32)
    return CommonAttentionMetadata(
        query_start_loc_np=np.arange(bucket + 1, dtype=np.int32),
        seq_lens_np=np.ones(bucket, dtype=np.int32),
        block_table_np=table,
        slot_mapping=slot_mapping[:bucket], num_reqs=bucket, num_actual_tokens=bucket,
        max_query_len=1, max_seq_len=1, block_size=block_size)


class CudaGraphRunner:
    """Captured decode forwards over the model runner's persistent buffers.

    `forward_fn(input_ids, positions, kv_caches, attn_metadata) -> hidden [T, H]` is the (compiled)
    model forward; `input_ids`, `positions`, `slot_mapping` are the runner's device buffers, which
    must outlive the graphs (the graphs read them at fixed addresses)."""

    def __init__(self, forward_fn: Callable[..., torch.Tensor], backend: AttentionBackend,
                 sizes: list[int], input_ids: torch.Tensor, positions: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_caches: list[torch.Tensor],
                 max_blocks_per_req: int, block_size: int, num_warmups: int = 2) -> None:
        if not backend.supports_cuda_graphs:
            raise ValueError(f"the {backend.name} attention backend cannot be captured")
        if not sizes:
            raise ValueError("no CUDA-graph sizes to capture")
        self.forward_fn = forward_fn
        self.backend = backend
        self.sizes = sorted(set(sizes))
        self.input_ids, self.positions, self.slot_mapping = input_ids, positions, slot_mapping
        self.kv_caches = kv_caches
        self.max_blocks_per_req = max_blocks_per_req
        self.block_size = block_size
        self.num_warmups = num_warmups
        self.graphs: dict[int, Any] = {}  # size -> torch.cuda.CUDAGraph
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.num_replays = 0

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def _zero_inputs(self, size: int) -> None:
        self.input_ids[:size].zero_()
        self.positions[:size].zero_()
        self.slot_mapping[:size].fill_(NULL_SLOT)

    @torch.inference_mode()
    def capture(self) -> float:
        """Warm and capture every bucket, largest first, into one pool; returns the seconds."""
        start = time.perf_counter()
        reserve = getattr(self.backend, "reserve_graph_buffers", None)
        if reserve is not None:
            reserve(self.max_size, self.max_size * self.max_blocks_per_req)
        pool = self._new_pool()
        for size in capture_order(self.sizes):
            self._zero_inputs(size)
            common = dummy_decode_metadata(size, self.max_blocks_per_req, self.block_size,
                                           self.slot_mapping)
            meta = self.backend.build_graph_metadata(common, size)
            for _ in range(self.num_warmups):  # compile / autotune outside the capture
                self.forward_fn(self.input_ids[:size], self.positions[:size], self.kv_caches,
                                meta)
            self.graphs[size], self.outputs[size] = self._capture_one(size, meta, pool)
        self._sync()
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d CUDA graphs (batch sizes %d..%d) in %.1f s", len(self.graphs),
                    self.sizes[0], self.max_size, self.capture_seconds)
        return self.capture_seconds

    # The CUDA calls, apart so that the CPU tests can stand in for them.
    def _new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def _sync(self) -> None:
        torch.cuda.synchronize()

    def _capture_one(self, size: int, meta: Any, pool: Any) -> tuple[Any, torch.Tensor]:
        """Capture one bucket's forward -> (graph, its static output [size, H])."""
        self._sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.forward_fn(self.input_ids[:size], self.positions[:size], self.kv_caches,
                                  meta)
        return graph, out

    def bucket(self, num_reqs: int) -> int | None:
        return bucket_for(num_reqs, self.sizes)

    def can_replay(self, num_tokens: int, num_reqs: int) -> bool:
        """A pure-decode step (one token per request) whose batch fits a captured bucket."""
        if num_tokens != num_reqs:
            return False
        size = self.bucket(num_reqs)
        return size is not None and size in self.graphs

    def replay(self, common: CommonAttentionMetadata) -> torch.Tensor:
        """Run the step's decode forward through its bucket's graph -> hidden [num_reqs, H].

        The caller has written the real rows of input_ids / positions / slot_mapping."""
        n = common.num_reqs
        size = self.bucket(n)
        if size is None or size not in self.graphs:
            raise ValueError(f"no captured graph holds a batch of {n}")
        if size > n:
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slot_mapping[n:size].fill_(NULL_SLOT)
        padded = pad_decode_metadata(common, size, self.slot_mapping)
        self.backend.build_graph_metadata(padded, size)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.outputs[size][:n]

    def stats(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "capture_s": self.capture_seconds,
                "num_replays": self.num_replays}
