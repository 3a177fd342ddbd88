"""The CPU floor arithmetic behind `fornax bench throughput`'s roofline section."""

from __future__ import annotations

import pytest
from torch import nn

from fornax.perf.datasets import BenchRequest
from fornax.perf.roofline import measure_read_bandwidth, model_bytes, workload_floor


def test_workload_floor_counts_weights_per_step_and_growing_contexts():
    reqs = [BenchRequest(prompt_len=10, output_len=3), BenchRequest(prompt_len=4, output_len=2)]
    floor = workload_floor(reqs, weight_bytes=1000, matmul_params=50, kv_bytes_per_token=2,
                           read_bps=100.0, matmul_flops=10.0)
    # Decode steps t=1 (both running: contexts 11 and 5) and t=2 (only the first: 12).
    expected_bytes = (1000 + 2 * (11 + 5)) + (1000 + 2 * 12)
    assert floor["decode_steps"] == 2
    assert floor["decode_gbytes"] == pytest.approx(expected_bytes / 1e9)
    assert floor["decode_floor_s"] == pytest.approx(expected_bytes / 100.0)
    assert floor["prefill_floor_s"] == pytest.approx(2 * 50 * 14 / 10.0)
    assert floor["floor_s"] == pytest.approx(floor["decode_floor_s"] + floor["prefill_floor_s"])


class _Tiny(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 8)
        self.proj = nn.Linear(8, 8, bias=False)
        self.lm_head = nn.Linear(8, 100, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight


def test_model_bytes_streams_a_tied_embedding_but_not_an_untied_lookup():
    total, streamed = model_bytes(_Tiny(tied=True))
    assert total == streamed == (100 * 8 + 8 * 8) * 4
    total, streamed = model_bytes(_Tiny(tied=False))
    assert total == (100 * 8 * 2 + 8 * 8) * 4
    assert streamed == (100 * 8 + 8 * 8) * 4


def test_read_bandwidth_is_a_plausible_rate():
    rate = measure_read_bandwidth(num_bytes=64 << 20, repeats=2)
    assert 1e8 < rate < 1e12
