"""Batch-size buckets for captured CUDA graphs: which sizes to capture, which one a batch uses."""

from __future__ import annotations

import bisect


def capture_sizes(configured: tuple[int, ...] | list[int] | None, max_num_seqs: int,
                  max_capture_size: int = 256) -> list[int]:
    """Sizes to capture, ascending: `--cuda-graph-sizes` if given, else [1, 2, 4, 8] and every
    multiple of 16 up to the largest batch the scheduler can form (capped at max_capture_size)."""
    limit = min(max_num_seqs, max_capture_size)
    if configured:
        sizes = sorted({int(s) for s in configured if 0 < int(s) <= limit})
    else:
        sizes = [s for s in (1, 2, 4, 8) if s <= limit] + list(range(16, limit + 1, 16))
    if not sizes:
        sizes = [1]
    return sizes


def bucket_for(num_reqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size holding `num_reqs`, or None (run eagerly) past the largest."""
    i = bisect.bisect_left(sizes, num_reqs)
    return sizes[i] if i < len(sizes) else None

