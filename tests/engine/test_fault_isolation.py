"""Per-request fault isolation: a failure at any stage fails one request (or one step), never the
engine; offline on tiny models, then through a real `fornax serve` with injected faults."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from fornax.runtime import SamplingParams
from fornax.runtime.engine import fault_injection
from fornax.runtime.engine.messages import (
    EncoderInput,
    EngineCoreOutput,
    EngineCoreRequest,
    EngineSpec,
    RequestRejected,
)
from fornax.runtime.engine.scheduling_core import MAX_CONSECUTIVE_STEP_FAILURES, EngineStepError
from fornax.runtime.errors import RequestFailedError
from fornax.runtime.sampling.params import StructuredOutputsParams
from fornax.runtime.scheduler.request import Request
from helpers.api_server import ServerProcess, sse_events, tiny_model_path

PROMPTS = ["The quick brown fox", "Once upon a time there", "In a galaxy far away"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# (stage, passes each request gets first): with passes, the fault hits a running request
PER_REQUEST_STAGES = [("admit", 0), ("schedule", 0), ("schedule", 2), ("prepare", 0),
                      ("sample", 0), ("stop_check", 0), ("stop_check", 3), ("output", 0),
                      ("output", 3)]


@pytest.fixture(autouse=True)
def _no_injection_after():
    yield
    fault_injection.configure(None)


def _next_ids(llm, count: int) -> list[str]:
    """The engine request ids the LLM's next generate call will use (one per prompt)."""
    probe = llm.generate(PROMPTS[0], SamplingParams(max_tokens=1))[0]
    start = int(probe.request_id) + 1
    return [str(start + i) for i in range(count)]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("stage, skip", PER_REQUEST_STAGES)
def test_a_fault_at_a_per_request_stage_fails_that_request_alone(make_llm, stage, skip):
    llm = make_llm("llama")
    baseline = _tokens(llm.generate(PROMPTS, GREEDY))
    ids = _next_ids(llm, len(PROMPTS))
    fault_injection.configure({"stage": stage, "request_id_contains": ids[1], "skip": skip})
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.request_id for o in outs] == ids
    failed = outs[1].outputs[0]
    assert failed.finish_reason == "error"
    assert ids[1] in failed.error and "injected fault" in failed.error
    assert ids[1] not in llm.engine.runner.batch.index  # the runner dropped its row
    for k in (0, 2):  # the batch mates finish exactly as without the fault
        assert outs[k].outputs[0].finish_reason == "length"
        assert outs[k].outputs[0].token_ids == baseline[k]
        assert outs[k].outputs[0].error is None
    fault_injection.configure(None)
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == baseline  # the engine keeps serving


def test_a_fault_after_some_tokens_fails_the_request_with_a_500_class_error(make_llm):
    llm = make_llm("llama")
    baseline = _tokens(llm.generate(PROMPTS, GREEDY))
    ids = _next_ids(llm, len(PROMPTS))
    fault_injection.configure({"stage": "sample", "request_id_contains": ids[0], "skip": 3})
    outs = llm.generate(PROMPTS, GREEDY)
    failed = outs[0].outputs[0]
    assert failed.finish_reason == "error" and "while sampling" in failed.error
    assert _tokens(outs)[1:] == baseline[1:]


def test_a_grammar_fault_fails_the_constrained_request_alone(make_llm):
    llm = make_llm("llama")
    constrained = SamplingParams(temperature=0.0, max_tokens=8,
                                 structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    params = [GREEDY, constrained, GREEDY]
    baseline = llm.generate(PROMPTS, params)
    ids = _next_ids(llm, len(PROMPTS))
    fault_injection.configure({"stage": "grammar", "request_id_contains": ids[1]})
    outs = llm.generate(PROMPTS, params)
    assert outs[1].outputs[0].finish_reason == "error"
    assert "output grammar" in outs[1].outputs[0].error
    assert _tokens(outs)[0::2] == _tokens(baseline)[0::2]
    fault_injection.configure(None)
    assert llm.generate(PROMPTS, params)[1].outputs[0].text in ("yes", "no")


class _BrokenMatcher:
    """A grammar matcher whose bitmask filling raises (everything else is the real one's)."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def __getattr__(self, name: str):
        return getattr(self.matcher, name)

    def fill_next_token_bitmask(self, *args) -> None:
        raise RuntimeError("this matcher broke")


def test_a_grammar_whose_bitmask_fails_fails_its_request_alone(make_llm):
    llm = make_llm("llama")
    engine = llm.engine
    choice = StructuredOutputsParams(choice=["yes", "no"])
    for rid, broken in (("g-ok", False), ("g-broken", True)):
        _add_unvalidated(engine, rid, SamplingParams(temperature=0.0, max_tokens=8,
                                                     structured_outputs=choice))
        request = engine.scheduler.requests[rid]
        request.grammar = engine.structured.new_matcher(choice)
        if broken:
            request.grammar = _BrokenMatcher(request.grammar)
    finals, tokens = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                finals[out.request_id] = out
    assert finals["g-broken"].finish_reason == "error"
    assert "output grammar" in finals["g-broken"].error and "matcher broke" in finals[
        "g-broken"].error
    assert finals["g-ok"].finish_reason == "stop"
    assert llm.tokenizer.decode(tokens["g-ok"]) in ("yes", "no")


def test_a_request_at_fault_gets_a_400_class_error(make_llm):
    llm = make_llm("llama")
    ids = _next_ids(llm, len(PROMPTS))
    fault_injection.configure({"stage": "stop_check", "request_id_contains": ids[2],
                               "error": "RequestError"})
    outs = llm.generate(PROMPTS, GREEDY)
    core_out = outs[2].outputs[0]
    assert core_out.finish_reason == "error" and "is invalid" in core_out.error


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(make_llm):
    llm = make_llm("llama", max_num_seqs=2)  # the third prompt waits for a later step
    baseline = _tokens(llm.generate(PROMPTS, GREEDY))
    ids = _next_ids(llm, len(PROMPTS))
    fault_injection.configure({"stage": "step", "request_id_contains": ids[1]})
    outs = llm.generate(PROMPTS, GREEDY)
    for k in (0, 1):  # both ran in the failed step
        assert outs[k].outputs[0].finish_reason == "error"
        assert "engine step it was part of failed" in outs[k].outputs[0].error
    assert outs[2].outputs[0].token_ids == baseline[2]
    assert ids[0] not in llm.engine.runner.batch.index
    assert ids[1] not in llm.engine.runner.batch.index


def test_consecutive_failed_steps_end_the_engine(make_llm):
    llm = make_llm("llama")
    fault_injection.configure({"stage": "step"})
    for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
        assert llm.generate(PROMPTS, GREEDY)[0].outputs[0].finish_reason == "error"
    fault_injection.configure(None)
    assert llm.generate(PROMPTS[0], GREEDY)[0].outputs[0].finish_reason == "length"  # resets
    fault_injection.configure({"stage": "step"})
    for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
        llm.generate(PROMPTS, GREEDY)
    with pytest.raises(EngineStepError, match=f"{MAX_CONSECUTIVE_STEP_FAILURES} engine steps"):
        llm.generate(PROMPTS, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_a_device_error_ends_the_engine_at_once(make_llm, monkeypatch):
    llm = make_llm("llama")

    def broken(out):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(llm.engine.runner, "execute_model", broken)
    with pytest.raises(EngineStepError, match="device error"):
        llm.generate(PROMPTS, GREEDY)


def _add_unvalidated(engine, rid: str, params: SamplingParams) -> None:
    """Past every validation, straight into the scheduler: the step alone must cope."""
    engine.scheduler.add_request(Request(
        request_id=rid, prompt_token_ids=[1, 2, 3, 4], sampling_params=params,
        eos_token_ids=engine.info.eos_token_ids, max_tokens=params.max_tokens))


@pytest.mark.parametrize("bad, status", [
    ({"min_tokens": 1, "stop_token_ids": [10**9]}, 400),  # the issue's first repro
    ({"temperature": 1.0, "top_k": 2**31}, None),  # its second: clamped, so it simply runs
    ({"seed": 2**70, "temperature": 1.0}, 400),
    ({"logprobs": 2**40}, 500),
    ({"logit_bias": {10**12: 1.0}}, 400),
])
def test_unvalidated_parameters_fail_their_request_alone(make_llm, bad, status):
    llm = make_llm("llama")
    engine = llm.engine
    _add_unvalidated(engine, "good-1", SamplingParams(temperature=0.0, max_tokens=4))
    _add_unvalidated(engine, "bad", SamplingParams(max_tokens=4, **bad))
    _add_unvalidated(engine, "good-2", SamplingParams(temperature=0.0, max_tokens=4))
    finals = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                finals[out.request_id] = out
    assert finals["good-1"].finish_reason == finals["good-2"].finish_reason == "length"
    assert len(tokens["good-1"]) == len(tokens["good-2"]) == 4
    if status is None:
        assert finals["bad"].finish_reason == "length"
    else:
        assert finals["bad"].finish_reason == "error"
        assert finals["bad"].error_status == status and "bad" in finals["bad"].error
        assert "bad" not in engine.runner.batch.index
    assert llm.generate(PROMPTS[0], GREEDY)[0].outputs[0].finish_reason == "length"


def test_pooling_core_fails_one_request_alone():
    from fornax.runtime import LLM
    from tools.make_tiny_bert import tiny_bert_dir

    llm = LLM(str(tiny_bert_dir("bert-embed")), dtype="float32", device="cpu")
    texts = ["alpha beta", "gamma delta", "epsilon"]
    baseline = [o.outputs.embedding for o in llm.embed(texts)]
    fault_injection.configure({"stage": "output", "request_id_contains": "4"})  # the 2nd next
    with pytest.raises(RequestFailedError, match="request 4 failed while building its output"):
        llm.embed(texts)
    assert not llm.engine.has_unfinished_requests()
    fault_injection.configure(None)
    again = [o.outputs.embedding for o in llm.embed(texts)]
    assert np.allclose(again, baseline)


def test_encoder_decoder_core_fails_one_request_alone():
    from fornax.audio.transcribe import WhisperInfo
    from fornax.runtime.config import make_engine_config
    from fornax.runtime.engine.factory import make_engine_core
    from helpers.whisper_fixtures import tiny_whisper_dir

    path = tiny_whisper_dir()
    ids = WhisperInfo.from_folder(path).ids
    engine = make_engine_core(make_engine_config(str(path), dtype="float32", device="cpu"))

    def request(rid: str, seed: int) -> EngineCoreRequest:
        feats = np.random.default_rng(seed).normal(0, 0.6, (80, 300)).astype(np.float32)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        return EngineCoreRequest(rid, [ids["sot"], ids["no_timestamps"]], params,
                                 encoder_input=EncoderInput(feats.tobytes(), list(feats.shape)))

    def run(tag: str) -> dict:
        for k in range(3):
            engine.add_request(request(f"{tag}-{k}", k))
        finals, tokens = {}, {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    finals[out.request_id] = (out.finish_reason, tokens[out.request_id])
        assert engine.kv.num_free_blocks() == engine.kv.pool.num_usable_blocks
        return finals

    baseline = run("base")
    fault_injection.configure({"stage": "sample", "request_id_contains": "boom-1", "skip": 2})
    faulty = run("boom")
    assert faulty["boom-1"][0] == "error"
    assert "boom-1" not in engine.runner.batch.index
    for k in (0, 2):
        assert faulty[f"boom-{k}"] == baseline[f"base-{k}"]


# ---- delivery to the API worker -----------------------------------------------------------------
def test_a_failed_request_reaches_its_worker_as_a_rejection_and_is_forgotten():
    from fornax.runtime.engine.process import EngineCoreProcess

    proc = EngineCoreProcess(EngineSpec("m", {}, "/nonexistent", "ipc://x", 1))
    proc.out = SimpleNamespace(q=queue.Queue())
    proc.owners = {"ok": "w1", "bad": "w2"}
    proc._route([EngineCoreOutput("ok", [5]),
                 EngineCoreOutput("bad", [], finish_reason="error", error="request bad is "
                                  "invalid: nope", error_status=400, error_param="top_k")])
    sent = [proc.out.q.get_nowait() for _ in range(proc.out.q.qsize())]
    assert ("rejected", "w2", RequestRejected("bad", "request bad is invalid: nope", "top_k",
                                              400)) in sent
    assert ("outputs", "w1", [EngineCoreOutput("ok", [5])]) in sent
    assert proc.owners == {"ok": "w1"}


def test_a_group_shows_what_came_before_its_failure_then_raises():
    from fornax.api.engine.client import RequestGroup
    from fornax.api.server.errors import APIError

    async def scenario() -> None:
        group = RequestGroup(["a"])
        group.put(EngineCoreOutput("a", [1, 2]))
        group.fail(APIError(500, "request a failed"), deliver_pending=True)
        assert [o.new_token_ids for o in await group.next()] == [[1, 2]]
        with pytest.raises(APIError, match="request a failed"):
            await group.next()

    asyncio.run(scenario())


# ---- through a real server ---------------------------------------------------------------------
FAULT = {"stage": "sample", "request_id_contains": "boom", "skip": 2}


@pytest.fixture(scope="module")
def fault_server():
    server = ServerProcess(str(tiny_model_path("llama")), "--max-model-len", "512",
                           "--served-model-name", "tiny",
                           env={fault_injection.ENV_VAR: json.dumps(FAULT)}).wait_ready()
    yield server
    server.stop()


def _completion(server, request_id: str, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 6, "temperature": 0.0,
            "ignore_eos": True, "request_id": request_id, **extra}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


@pytest.mark.slow
def test_server_fails_the_faulty_request_with_a_500_and_serves_the_rest(fault_server):
    results: dict[str, httpx.Response] = {}
    threads = [threading.Thread(target=lambda rid=rid: results.__setitem__(
        rid, _completion(fault_server, rid))) for rid in ("boom-1", "fine-1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = results["boom-1"]
    assert bad.status_code == 500, bad.text
    error = bad.json()["error"]
    assert "boom-1" in error["message"] and "while sampling" in error["message"]
    good = results["fine-1"]
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(fault_server.url + "/health", timeout=10).status_code == 200
    assert _completion(fault_server, "fine-2").status_code == 200


@pytest.mark.slow
def test_server_stream_ends_with_an_error_event_then_done(fault_server):
    with httpx.stream("POST", fault_server.url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "hello there", "max_tokens": 6, "temperature": 0.0,
            "ignore_eos": True, "request_id": "boom-stream", "stream": True}) as resp:
        assert resp.status_code == 200
        events = sse_events(resp.read().decode())
    assert events[-1] == "[DONE]"
    assert "boom-stream" in events[-2]["error"]["message"]
    assert any(e["choices"][0]["text"] for e in events[:-2])  # tokens came before the error
    assert httpx.get(fault_server.url + "/health", timeout=10).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("extra, param", [
    ({"min_tokens": 1, "stop_token_ids": [1_000_000_000]}, "stop_token_ids"),
    ({"temperature": 1.0, "top_k": 2147483648}, "top_k"),
])
def test_server_refuses_the_issue_repros_with_a_400(fault_server, extra, param):
    resp = _completion(fault_server, "repro", **{**extra, "max_tokens": 4})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert httpx.get(fault_server.url + "/health", timeout=10).status_code == 200
    assert _completion(fault_server, "after-repro").status_code == 200


@pytest.mark.slow
def test_server_input_thread_survives_a_failure_while_taking_a_request():
    """A bug on the engine's input thread fails that request (500), not admission itself."""
    fault = {"stage": "input", "request_id_contains": "boom"}
    server = ServerProcess(str(tiny_model_path("llama")), "--max-model-len", "512",
                           "--served-model-name", "tiny",
                           env={fault_injection.ENV_VAR: json.dumps(fault)}).wait_ready()
    try:
        for i in range(3):
            bad = _completion(server, f"boom-{i}")
            assert bad.status_code == 500, bad.text
            assert "while admitting" in bad.json()["error"]["message"]
            assert _completion(server, f"fine-{i}").status_code == 200
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_server_dies_after_consecutive_failed_steps():
    server = ServerProcess(str(tiny_model_path("llama")), "--max-model-len", "512",
                           "--served-model-name", "tiny",
                           env={fault_injection.ENV_VAR: json.dumps({"stage": "step"})})
    try:
        server.wait_ready()
        for k in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):  # each fails alone; /health stays up
            resp = _completion(server, f"doomed-{k}")
            assert resp.status_code == 500 and "engine step" in resp.json()["error"]["message"]
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        resp = _completion(server, "last-straw")
        assert resp.status_code == 503, resp.text  # the engine core died (EngineDead)
        assert server.proc.wait(timeout=30) != 0  # so `fornax serve` exits for a restart
    finally:
        server.stop()
