"""Word-level timing for Whisper: cross-attention of the alignment heads + DTW (engine core).

For requests that ask for it, the decoder records the cross-attention weights of the alignment
heads at every position that predicts an output token. When the request finishes, the weights of
the positions that predicted text tokens (and the final end-of-text) are normalized, median
filtered and averaged over heads, and dynamic time warping against the audio frames gives each
such output token the frame (20 ms units) where it starts — OpenAI's `find_alignment`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MEDFILT_WIDTH = 7


class AlignmentTracker:
    """Collects alignment-head attention rows per request; `finish` turns them into frames."""

    def __init__(self, generation_config: dict[str, Any], spec: Any) -> None:
        heads = generation_config.get("alignment_heads") or [
            [layer, h] for layer in range(spec.decoder_layers // 2, spec.decoder_layers)
            for h in range(spec.decoder_heads)]
        self.heads: dict[int, list[int]] = {}
        for layer, head in heads:
            self.heads.setdefault(int(layer), []).append(int(head))
        self.tracked: dict[str, _Track] = {}
        self._step: list[tuple[str, int]] = []  # (request id, number of captured rows) this step

    def start(self, req_id: str, prompt_len: int, num_frames: int = 1500) -> None:
        self.tracked[req_id] = _Track(prompt_len, num_frames)

    def drop(self, req_id: str) -> None:
        self.tracked.pop(req_id, None)

    def plan(self, meta: Any, req_ids: list[str], rows: np.ndarray, qsl: np.ndarray,
             computed: np.ndarray, num_sched: np.ndarray, device: torch.device) -> None:
        """Mark the flat positions whose outputs are output tokens of tracked requests."""
        self._step = []
        if not self.tracked:
            return
        index: list[int] = []
        slots: list[int] = []
        for i, rid in enumerate(req_ids):
            track = self.tracked.get(rid)
            if track is None:
                continue
            first = max(int(computed[i]), track.prompt_len - 1, track.num_rows + track.prompt_len - 1)
            last = int(computed[i] + num_sched[i])  # exclusive
            if first >= last:
                continue
            start = int(qsl[i]) + first - int(computed[i])
            index.extend(range(start, start + last - first))
            slots.extend([int(rows[i])] * (last - first))
            self._step.append((rid, last - first))
        if index:
            meta.align_token_index = torch.tensor(index, device=device)
            meta.align_slots = torch.tensor(slots, device=device)
            meta.align_heads = self.heads

    def collect(self, meta: Any) -> None:
        if not self._step or not meta.align_out:
            return
        weights = torch.cat([meta.align_out[layer] for layer in sorted(meta.align_out)], dim=1)
        weights_np = weights.to(torch.float16).cpu().numpy()  # [A, heads, T_enc]
        offset = 0
        for rid, count in self._step:
            track = self.tracked.get(rid)
            if track is not None:
                track.rows.extend(weights_np[offset:offset + count])
            offset += count
        self._step = []

    def finish(self, req_id: str, output_ids: list[int], eot: int) -> list[int] | None:
        """Start frame of each output token that is text or the final end-of-text; -1 elsewhere."""
        track = self.tracked.pop(req_id, None)
        if track is None:
            return None
        n = min(len(output_ids), len(track.rows))
        keep = [k for k in range(n) if output_ids[k] <= eot]
        result = [-1] * len(output_ids)
        if len(keep) < 2:
            return result
        weights = np.stack([track.rows[k] for k in keep], axis=1).astype(np.float32)
        starts = token_start_frames(weights[:, :, : max(2, track.num_frames)])
        for k, frame in zip(keep, starts):
            result[k] = int(frame)
        return result


class _Track:
    __slots__ = ("num_frames", "prompt_len", "rows")

    def __init__(self, prompt_len: int, num_frames: int) -> None:
        self.prompt_len, self.num_frames = prompt_len, num_frames
        self.rows: list[np.ndarray] = []

    @property
    def num_rows(self) -> int:
        return len(self.rows)


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window along the last axis, reflect-padded (as OpenAI's)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.median(windows, axis=-1)


def token_start_frames(weights: np.ndarray) -> np.ndarray:
    """weights [heads, tokens, frames] (softmaxed) -> the start frame of each token row."""
    std = weights.std(axis=-2, keepdims=True)
    mean = weights.mean(axis=-2, keepdims=True)
    norm = (weights - mean) / np.maximum(std, 1e-8)
    matrix = median_filter(norm, MEDFILT_WIDTH).mean(axis=0)
    text_idx, time_idx = dtw(-matrix.astype(np.float64))
    jumps = np.concatenate([[True], np.diff(text_idx) > 0])
    return time_idx[jumps]


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic time warping path through cost [N, M]: row-vectorized, OpenAI's tie-breaking."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    trace = np.zeros((n + 1, m + 1), dtype=np.int8)
    for i in range(1, n + 1):
        prev = acc[i - 1]
        a = np.minimum(prev[:-1], prev[1:])  # best of diagonal and up, for columns 1..m
        c = cost[i - 1]
        s = np.concatenate([[0.0], np.cumsum(c)])  # prefix sums: s[j] = c[0] + ... + c[j-1]
        # acc[i, j] = c[j-1] + min(a[j-1], acc[i, j-1]) unrolled: s[j] + min_k<=j (a[k-1] - s[k-1])
        acc[i, 1:] = s[1:] + np.minimum.accumulate(a - s[:-1])
        c0, c1, c2 = prev[:-1], prev[1:], acc[i, :-1]
        trace[i, 1:] = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = n, m
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    arr = np.array(path[::-1]).T
    return arr[0], arr[1]
