"""Unit tests of the scheduler with no model: budgets, chunking, preemption, priority, abort."""

from __future__ import annotations

from fornax.runtime.config import CacheConfig, SchedulerConfig
from fornax.runtime.kv_cache.kv_cache_manager import KVCacheManager
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.scheduler.request import Request, RequestStatus
from fornax.runtime.scheduler.scheduler import Scheduler, SchedulerOutput


def make_scheduler(num_blocks: int = 64, budget: int = 64, max_seqs: int = 8,
                   policy: str = "fcfs", chunked: bool = True, block_size: int = 4,
                   caching: bool = True) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, max_model_len=256, enable_caching=caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     enable_chunked_prefill=chunked, policy=policy),
                     CacheConfig(block_size=block_size), kv, max_model_len=256)


def make_request(rid: str, n: int, max_tokens: int = 4, priority: int = 0,
                 arrival: float = 0.0, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens),
                   priority=priority, arrival_time=arrival, max_tokens=max_tokens,
                   eos_token_ids=frozenset({999}))


def run_step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    out = s.schedule()
    s.update_from_output(out, {rid: token for rid in out.num_scheduled_tokens})
    return out


def assert_all_free(s: Scheduler) -> None:
    assert s.kv.num_free_blocks() == s.kv.pool.num_usable_blocks


def test_budget_is_shared_and_prefill_is_chunked() -> None:
    s = make_scheduler(budget=10)
    s.add_request(make_request("a", 8))
    s.add_request(make_request("b", 8, start=100))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 8, "b": 2}
    assert out.total_num_scheduled_tokens == 10
    assert [r.req_id for r in out.scheduled_new_reqs] == ["a", "b"]
    s.update_from_output(out, {"a": 5, "b": 5})
    a, b = s.requests["a"], s.requests["b"]
    assert a.output_token_ids == [5] and b.output_token_ids == []  # b's chunk sample discarded
    out = s.schedule()
    # Running requests first: a decodes one token, b continues its prefill with the rest.
    assert out.num_scheduled_tokens == {"a": 1, "b": 6}
    assert [r.req_id for r in out.scheduled_cached_reqs] == ["a", "b"]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget() -> None:
    s = make_scheduler(budget=10, chunked=False)
    s.add_request(make_request("a", 6))
    s.add_request(make_request("b", 6, start=100))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 6}


def test_max_num_seqs_limits_running() -> None:
    s = make_scheduler(max_seqs=2)
    for i in range(3):
        s.add_request(make_request(f"r{i}", 4, start=10 * i))
    out = s.schedule()
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}
    assert s.num_waiting == 1


def test_requests_finish_on_length_eos_and_stop_ids() -> None:
    s = make_scheduler()
    s.add_request(make_request("len", 4, max_tokens=2))
    eos = make_request("eos", 4, start=50)
    s.add_request(eos)
    stop = make_request("stop", 4, start=90)
    stop.sampling_params.stop_token_ids = [42]
    s.add_request(stop)
    out = s.schedule()
    res = s.update_from_output(out, {"len": 1, "eos": 999, "stop": 42})
    done = {r.request_id: r.status for r, _ in res}
    assert done["eos"] == RequestStatus.FINISHED_STOPPED
    assert done["stop"] == RequestStatus.FINISHED_STOPPED and stop.stop_reason == 42
    assert done["len"] == RequestStatus.RUNNING
    run_step(s)
    assert s.requests == {} and not s.has_unfinished_requests()
    assert_all_free(s)


def test_min_tokens_defers_eos() -> None:
    s = make_scheduler()
    r = make_request("r", 4, max_tokens=10)
    r.sampling_params.min_tokens = 3
    s.add_request(r)
    for _ in range(2):
        run_step(s, token=999)
        assert r.status == RequestStatus.RUNNING
    run_step(s, token=999)
    assert r.status == RequestStatus.FINISHED_STOPPED


def test_preemption_frees_blocks_and_recomputes_later() -> None:
    # 6 usable blocks of 4 tokens; two 8-token prompts fill 4, decoding needs more.
    s = make_scheduler(num_blocks=7, max_seqs=4, caching=False)
    s.add_request(make_request("old", 8, max_tokens=12, arrival=0.0))
    s.add_request(make_request("new", 8, max_tokens=12, start=100, arrival=1.0))
    for _ in range(12):
        run_step(s)
        if s.num_preemptions:
            break
    assert s.num_preemptions >= 1
    new = s.requests["new"]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert s.waiting[0] is new  # back at the front, recomputed when blocks free up
    while s.has_unfinished_requests():
        run_step(s)
    assert_all_free(s)
    assert new.num_output_tokens == 12


def test_priority_policy_orders_waiting_and_preempts_lowest_priority() -> None:
    s = make_scheduler(max_seqs=1, policy="priority")
    s.add_request(make_request("low", 4, priority=5, arrival=0.0))
    s.add_request(make_request("high", 4, priority=-1, arrival=1.0, start=10))
    s.add_request(make_request("mid", 4, priority=0, arrival=2.0, start=20))
    assert [r.request_id for r in s.waiting] == ["high", "mid", "low"]
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["high"]

    s2 = make_scheduler(num_blocks=5, max_seqs=4, policy="priority", caching=False)
    s2.add_request(make_request("vip", 4, max_tokens=12, priority=0, arrival=1.0))
    s2.add_request(make_request("bulk", 4, max_tokens=12, priority=9, arrival=0.0, start=50))
    while not s2.num_preemptions:
        run_step(s2)
    assert s2.requests["bulk"].status == RequestStatus.PREEMPTED
    assert s2.requests["vip"].status == RequestStatus.RUNNING


def test_priority_preemption_of_a_request_scheduled_earlier_in_the_step() -> None:
    """The priority policy may preempt a request that already got tokens this step (it runs
    first but has the worst priority): it must leave the step entirely, with its budget back,
    and never reach the runner as a 'new' request without blocks."""
    s = make_scheduler(num_blocks=3, budget=64, policy="priority", block_size=4)  # 2 usable
    low = make_request("low", 1, max_tokens=6, priority=5, arrival=0.0)
    s.add_request(low)
    run_step(s)
    s.add_request(make_request("high", 3, max_tokens=5, priority=0, arrival=1.0, start=100))
    run_step(s)
    assert [r.request_id for r in s.running] == ["low", "high"]
    out = None
    for _ in range(10):
        out = run_step(s)
        if low.status == RequestStatus.PREEMPTED:
            break
    assert out is not None
    assert "low" not in out.num_scheduled_tokens  # it left this step
    assert all(r.req_id != "low" for r in out.scheduled_new_reqs)
    assert all(r.req_id != "low" for r in out.scheduled_cached_reqs)
    assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
    assert "high" in out.num_scheduled_tokens
    assert "low" not in s._runner_known  # re-sent whole, with blocks, when it comes back
    assert [r.request_id for r in s.waiting] == ["low"]
    for _ in range(50):
        if not s.has_unfinished_requests():
            break
        run_step(s)
    assert not s.has_unfinished_requests()
    assert_all_free(s)


def test_abort_running_and_waiting_requests() -> None:
    s = make_scheduler(max_seqs=1)
    s.add_request(make_request("run", 4))
    s.add_request(make_request("wait", 4, start=10))
    run_step(s)
    aborted = s.abort_requests(["run", "wait", "unknown"])
    assert {r.request_id for r in aborted} == {"run", "wait"}
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in aborted)
    assert not s.has_unfinished_requests()
    assert_all_free(s)
    out = s.schedule()
    assert out.finished_req_ids == {"run"}  # the runner is told to drop what it knew


def test_prefix_hits_skip_computed_tokens() -> None:
    s = make_scheduler()
    s.add_request(make_request("a", 9))
    run_step(s)
    s.add_request(make_request("b", 9))
    out = s.schedule()
    assert out.num_scheduled_tokens["b"] == 1  # 8 tokens came from the cache
    assert s.requests["b"].num_cached_tokens == 8
    new_b = [r for r in out.scheduled_new_reqs if r.req_id == "b"][0]
    assert new_b.num_computed_tokens == 8
