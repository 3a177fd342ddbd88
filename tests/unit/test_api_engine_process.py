"""Serve plumbing without a model: engine-side refusals, output merging, routing to workers."""

from __future__ import annotations

import asyncio
import queue
from types import SimpleNamespace

import msgspec
import pytest

from fornax.api.engine.client import EngineClient, RequestGroup
from fornax.api.server.errors import APIError
from fornax.runtime.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineMessage,
    EngineSpec,
    EngineStats,
    RequestRejected,
    StatsQuery,
    TokenLogprobs,
)
from fornax.runtime.engine.process import EngineCoreProcess
from fornax.runtime.errors import RequestError
from fornax.runtime.sampling.params import SamplingParams


class _FakeCore:
    """Just enough of the engine contract (runtime/engine/contract.py) for the process's
    admission and routing code: no capabilities."""

    structured = None
    pooling_info = None
    sleep_mode = None

    def __init__(self, error: Exception | None = None, num_waiting: int = 0) -> None:
        self.error = error
        self.scheduler = SimpleNamespace(num_waiting=num_waiting, num_running=0, requests={},
                                         num_waiting_prompt_tokens=0)
        self.added: list[str] = []

    def add_request(self, req: EngineCoreRequest) -> None:
        if self.error is not None:
            raise self.error
        self.added.append(req.request_id)

    def abort_requests(self, ids: list[str]) -> list[EngineCoreOutput]:
        return [EngineCoreOutput(i, [], finish_reason="abort") for i in ids]

    def stats(self) -> dict:
        return {"num_running": 1, "num_waiting": 2, "kv_usage": 0.5, "prefix_cache_queries": 3,
                "prefix_cache_hits": 1, "num_preemptions": 0}


def _process(core: _FakeCore, max_queued: int | None = None) -> EngineCoreProcess:
    proc = EngineCoreProcess(EngineSpec("m", {}, "/nonexistent", "ipc://x", 1))
    proc.core = core
    proc.max_queued_reqs = max_queued
    proc.out = SimpleNamespace(q=queue.Queue())
    return proc


def _sent(proc: EngineCoreProcess) -> list[tuple[str, object]]:
    """What the busy loop handed to the output thread, as the worker would decode it."""
    items = []
    while not proc.out.q.empty():
        kind, client, payload = proc.out.q.get()
        if kind == "outputs":
            payload = EngineCoreOutputs(outputs=payload)
        elif kind == "rejected":
            payload = EngineCoreOutputs(rejected=[payload])
        if not isinstance(payload, bytes):
            payload = msgspec.msgpack.encode(payload)
        items.append((client, msgspec.msgpack.decode(payload, type=EngineMessage)))
    return items


def _req(rid: str = "r1") -> AddRequest:
    return AddRequest(EngineCoreRequest(rid, [1, 2, 3], SamplingParams(max_tokens=4)))


@pytest.mark.parametrize("error,status,param", [
    (RequestError("prompt too long: 9000 > 8192", "prompt"), 400, "prompt"),
    (ValueError("odd"), 400, None),
    (RuntimeError("bug"), 500, None),
])
def test_engine_side_errors_come_back_as_rejections(error, status, param):
    proc = _process(_FakeCore(error))
    proc._handle(b"w1", _req())
    [(client, msg)] = _sent(proc)
    assert client == "w1" and isinstance(msg, EngineCoreOutputs)
    [rej] = msg.rejected
    assert (rej.request_id, rej.status, rej.param) == ("r1", status, param)
    assert "r1" not in proc.owners


def test_admission_limit_and_drain_refuse_with_503():
    proc = _process(_FakeCore(num_waiting=2), max_queued=2)
    proc._handle(b"w1", _req())
    [(_, msg)] = _sent(proc)
    assert msg.rejected[0].status == 503 and "max-num-queued" in msg.rejected[0].message
    proc = _process(_FakeCore())
    proc.drain_requested = True
    proc._handle(b"w1", _req())
    [(_, msg)] = _sent(proc)
    assert msg.rejected[0].status == 503 and "shutting down" in msg.rejected[0].message


def test_outputs_go_to_the_owning_worker_and_stats_to_the_asker():
    core = _FakeCore()
    proc = _process(core)
    proc._handle(b"w1", _req("a"))
    proc._handle(b"w2", _req("b"))
    assert core.added == ["a", "b"]
    proc._route([EngineCoreOutput("a", [5]), EngineCoreOutput("b", [6], finish_reason="length")])
    sent = dict(_sent(proc))
    assert sent["w1"].outputs[0].new_token_ids == [5]
    assert sent["w2"].outputs[0].finish_reason == "length"
    assert proc.owners == {"a": "w1"}  # finished requests are forgotten
    proc._handle(b"w1", AbortRequests(["a"]))
    [(client, msg)] = _sent(proc)
    assert client == "w1" and msg.outputs[0].finish_reason == "abort" and not proc.owners
    proc._handle(b"w2", StatsQuery(7))
    [(client, stats)] = _sent(proc)
    assert client == "w2" and isinstance(stats, EngineStats)
    assert (stats.query_id, stats.num_waiting, stats.kv_usage) == (7, 2, 0.5)


def test_request_group_merges_outputs_until_read():
    async def run() -> None:
        group = RequestGroup(["x", "y"])
        lp = TokenLogprobs([5, 6], [-0.1, -2.0], 1)
        group.put(EngineCoreOutput("x", [5], new_logprobs=[lp], num_cached_tokens=16,
                                   prompt_logprobs=[lp], prompt_logprobs_start=1))
        group.put(EngineCoreOutput("x", [6], new_logprobs=[lp], prompt_logprobs=[lp, lp],
                                   prompt_logprobs_start=2))
        group.put(EngineCoreOutput("y", [7], finish_reason="stop", stop_reason=7))
        outs = {o.request_id: o for o in await group.next()}
        assert outs["x"].new_token_ids == [5, 6] and len(outs["x"].new_logprobs) == 2
        assert outs["x"].prompt_logprobs_start == 1 and len(outs["x"].prompt_logprobs) == 3
        assert outs["y"].finish_reason == "stop" and group.unfinished == {"x"}
        group.fail(APIError(503, "engine gone"))
        with pytest.raises(APIError):
            await group.next()

    asyncio.run(run())


def test_client_maps_rejections_and_death_to_api_errors():
    async def run() -> None:
        client = EngineClient("/nonexistent")
        g1, g2 = RequestGroup(["a"]), RequestGroup(["b"])
        client.groups.update(a=g1, b=g2)
        client._dispatch(EngineCoreOutputs(rejected=[
            RequestRejected("a", "bad prompt", "prompt", 400)]))
        with pytest.raises(APIError) as bad:
            await g1.next()
        assert (bad.value.status, bad.value.param) == (400, "prompt")
        client._dispatch(EngineCoreOutputs(rejected=[RequestRejected("b", "busy", None, 503)]))
        with pytest.raises(APIError) as busy:
            await g2.next()
        assert busy.value.status == 503 and busy.value.headers["retry-after"].isdigit()
        g3 = RequestGroup(["c"])
        client.groups["c"] = g3
        client._mark_dead("killed")
        with pytest.raises(APIError) as dead:
            await g3.next()
        assert dead.value.status == 503 and client.dead
        with pytest.raises(APIError):
            await client.add([EngineCoreRequest("d", [1], SamplingParams())])

    asyncio.run(run())
