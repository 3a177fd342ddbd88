"""The adaptive prefill budget with no model: the step-cost model's arithmetic, the cap it gives,
and the scheduler's decisions under an injected cost model (no timing involved)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fornax.runtime.config import CacheConfig, SchedulerConfig, make_engine_config
from fornax.runtime.errors import ConfigError
from fornax.runtime.kv_cache.kv_cache_manager import KVCacheManager
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.scheduler.prefill_budget import (
    MIN_FAST_CHUNK,
    MIN_PREFILL_CHUNK,
    PrefillBudget,
    StepCostModel,
)
from fornax.runtime.scheduler.request import Request
from fornax.runtime.scheduler.scheduler import Scheduler, SchedulerOutput


@dataclass
class FixedCost:
    """An injected cost model: a decode step and a prompt token cost what the test says."""

    decode_s: float | None = 0.020
    prefill_s_per_token: float | None = 0.0005


def make_scheduler(budget: int = 512, factor: float = 2.0, cost: FixedCost | None = None,
                   chunked: bool = True, threshold: int = 0, partial: int = 1) -> Scheduler:
    kv = KVCacheManager(256, 4, max_model_len=512, enable_caching=False)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                             enable_chunked_prefill=chunked, prefill_itl_factor=factor,
                             long_prefill_token_threshold=threshold,
                             max_num_partial_prefills=partial)
    s = Scheduler(config, CacheConfig(block_size=4), kv, max_model_len=512)
    if cost is not None:
        s.prefill_budget.model = cost
    return s


def make_request(rid: str, n: int, start: int = 0, max_tokens: int = 50) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens, eos_token_ids=frozenset({999}))


def run_step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    s.update_from_output(out, {rid: 7 for rid in out.num_scheduled_tokens})
    return out


def decoding_scheduler(**kwargs) -> Scheduler:
    """A scheduler whose request "a" has finished its prompt and decodes."""
    s = make_scheduler(**kwargs)
    s.add_request(make_request("a", 8))
    run_step(s)
    assert s.requests["a"].num_output_tokens == 1
    return s


def test_cost_model_learns_decode_step_and_prompt_token_cost() -> None:
    m = StepCostModel(alpha=0.5)
    assert m.decode_s is None and m.prefill_s_per_token is None
    m.observe(num_decode_reqs=0, num_prefill_tokens=100, seconds=0.050)  # no decode known yet
    assert m.prefill_s_per_token == pytest.approx(0.0005)
    m.observe(2, 0, 0.020)
    m.observe(2, 0, 0.030)
    assert m.decode_s == pytest.approx(0.025)
    m.observe(2, 50, 0.025 + 50 * 0.001)  # the decode step, plus 1 ms a prompt token
    # moving sums: extra (0.05 + 0.05) / 2, tokens (100 + 50) / 2
    assert m.prefill_s_per_token == pytest.approx(0.05 / 75)
    m.observe(0, 0, 1.0)  # an empty step teaches nothing
    m.observe(2, 0, float("nan"))
    m.observe(2, 0, -1.0)
    assert m.decode_s == pytest.approx(0.025)


def test_cap_is_the_prompt_tokens_that_fit_the_itl_factor() -> None:
    budget = PrefillBudget(2.0, FixedCost(0.020, 0.0005))
    assert budget.cap(num_decodes=0) is None  # nobody waits for a token: the whole budget
    assert budget.cap(num_decodes=1) == 40  # (2 - 1) * 20 ms / 0.5 ms
    assert PrefillBudget(1.5, FixedCost(0.020, 0.0001)).cap(1) == 100
    assert PrefillBudget(1.0, FixedCost(0.020, 0.0005)).cap(1) == MIN_PREFILL_CHUNK
    assert PrefillBudget(0, FixedCost(0.020, 0.0005)).cap(1) is None  # off
    assert PrefillBudget(2.0, FixedCost(None, 0.0005)).cap(1) is None  # not measured yet
    assert PrefillBudget(2.0, FixedCost(0.020, None)).cap(1) is None
    assert PrefillBudget(2.0, FixedCost(0.020, 0.0)).cap(1) is None


def test_a_fast_path_keeps_the_chunk_within_its_room_beside_the_decodes() -> None:
    budget = PrefillBudget(2.0, FixedCost(0.020, 0.0001))  # the model alone: 200 tokens
    budget.fast_tokens = 39  # steps of up to 39 tokens run in one fused call
    assert budget.cap(num_decodes=4) == 35  # the room left beside four decodes
    assert budget.cap(num_decodes=0) is None  # nothing decodes: the whole budget (TTFT)
    assert PrefillBudget(2.0, FixedCost(0.020, 0.002)).cap(4) == MIN_PREFILL_CHUNK
    slow = PrefillBudget(2.0, FixedCost(0.020, 0.002))  # the model says 10
    slow.fast_tokens = 39
    assert slow.cap(4) == 10  # on the fast path the model's fit stands under the 32 floor
    slower = PrefillBudget(2.0, FixedCost(0.020, 0.01))  # the model says 2
    slower.fast_tokens = 39
    assert slower.cap(4) == MIN_FAST_CHUNK  # the fast path's floor
    unmeasured = PrefillBudget(2.0, FixedCost(None, None))
    unmeasured.fast_tokens = 39
    assert unmeasured.cap(4) == 35  # no measurement yet: still on the fast path
    # too little room beside many decodes: the model's cap, on the per-op path
    assert budget.cap(39 - MIN_FAST_CHUNK + 1) == 200
    off = PrefillBudget(0, FixedCost(0.020, 0.0001))
    off.fast_tokens = 39
    assert off.cap(4) is None  # factor 0: the fixed budget, fast path or not


def test_a_long_prompt_is_chunked_within_the_fast_path_room() -> None:
    s = decoding_scheduler(cost=FixedCost(0.020, 0.0005))  # the model alone: 40 a step
    s.prefill_budget.fast_tokens = 24
    s.add_request(make_request("b", 60, start=100))
    chunks = []
    for _ in range(3):
        out = run_step(s)
        assert out.num_scheduled_tokens["a"] == 1
        chunks.append(out.num_scheduled_tokens["b"])
    assert chunks == [23, 23, 14]  # 24 tokens a step with the decode


def test_a_long_prompt_is_chunked_while_a_stream_decodes_every_step() -> None:
    s = decoding_scheduler(cost=FixedCost(0.020, 0.0005))  # cap 40 prompt tokens a step
    s.add_request(make_request("b", 150, start=100))
    chunks = []
    for _ in range(4):
        out = run_step(s)
        assert out.num_scheduled_tokens["a"] == 1  # the stream gets its token every step
        assert out.num_decode_reqs == 1
        chunks.append(out.num_scheduled_tokens["b"])
        assert out.num_prefill_tokens == chunks[-1]
    assert chunks == [40, 40, 40, 30]
    assert s.requests["b"].num_output_tokens == 1  # its prompt is done, it samples


def test_without_decodes_a_prompt_gets_the_whole_budget() -> None:
    s = make_scheduler(cost=FixedCost(0.020, 0.0005))
    s.add_request(make_request("b", 300))
    out = run_step(s)
    assert out.num_scheduled_tokens == {"b": 300}
    assert (out.num_decode_reqs, out.num_prefill_tokens) == (0, 300)


def test_the_cap_never_goes_below_the_minimum_chunk_nor_above_the_budget() -> None:
    s = decoding_scheduler(cost=FixedCost(0.001, 0.01))  # a prompt token costs 10 decode steps
    s.add_request(make_request("b", 100, start=100))
    assert run_step(s).num_scheduled_tokens["b"] == MIN_PREFILL_CHUNK
    s = decoding_scheduler(budget=64, cost=FixedCost(1.0, 1e-6))  # prompt tokens nearly free
    s.add_request(make_request("b", 100, start=100))
    assert run_step(s).num_scheduled_tokens == {"a": 1, "b": 63}


def test_factor_zero_or_unmeasured_keeps_the_fixed_budget() -> None:
    for s in (decoding_scheduler(factor=0, cost=FixedCost(0.020, 0.0005)),
              decoding_scheduler(cost=FixedCost(None, None)),
              decoding_scheduler()):  # the online model has seen nothing
        s.add_request(make_request("b", 150, start=100))
        assert run_step(s).num_scheduled_tokens == {"a": 1, "b": 150}


def test_without_chunked_prefill_the_cap_does_not_apply() -> None:
    s = decoding_scheduler(chunked=False, cost=FixedCost(0.020, 0.0005))
    s.add_request(make_request("b", 150, start=100))
    assert run_step(s).num_scheduled_tokens == {"a": 1, "b": 150}


def test_the_cap_is_shared_by_running_chunks_and_new_prompts() -> None:
    s = decoding_scheduler(cost=FixedCost(0.020, 0.0005), partial=2)  # cap 40
    s.add_request(make_request("b", 50, start=100))
    s.add_request(make_request("c", 50, start=200))
    assert run_step(s).num_scheduled_tokens == {"a": 1, "b": 40}
    # b's last 10 tokens first (running requests first), then c with what is left of the cap
    assert run_step(s).num_scheduled_tokens == {"a": 1, "b": 10, "c": 30}
    assert run_step(s).num_scheduled_tokens == {"a": 1, "b": 1, "c": 20}


def test_long_prefill_token_threshold_caps_each_prompt_and_short_ones_join() -> None:
    s = make_scheduler(threshold=16)
    s.add_request(make_request("long", 40))
    s.add_request(make_request("short", 10, start=100))
    s.add_request(make_request("long2", 40, start=200))
    # long is cut to 16 and stays partial; short finishes in this step so it may join; long2
    # would be a second partial prefill (max_num_partial_prefills 1) so it waits
    assert run_step(s).num_scheduled_tokens == {"long": 16, "short": 10}
    assert run_step(s).num_scheduled_tokens == {"long": 16, "short": 1}
    s = make_scheduler(threshold=16, partial=2)
    s.add_request(make_request("long", 40))
    s.add_request(make_request("long2", 40, start=200))
    assert run_step(s).num_scheduled_tokens == {"long": 16, "long2": 16}


@pytest.mark.parametrize("kwargs, message", [
    ({"prefill_itl_factor": 0.5}, "prefill_itl_factor must be 0"),
    ({"prefill_itl_factor": float("nan")}, "prefill_itl_factor"),
    ({"prefill_itl_factor": 1e9}, "prefill_itl_factor"),
    ({"long_prefill_token_threshold": -1}, "long_prefill_token_threshold"),
    ({"max_num_partial_prefills": 0}, "max_num_partial_prefills"),
])
def test_bad_prefill_settings_raise_config_error(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_engine_config("some-model", **kwargs)
