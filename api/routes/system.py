"""Operational routes: /health, /health_generate, /ping, /version, /load, /metrics (API workers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from fornax.api.routes.audio import is_transcription, transcription_probe
from fornax.api.routes.pooling_common import is_pooling, pooling_probe
from fornax.api.server.errors import APIError, EngineDeadError
from fornax.api.server.http import Request, Response, json_response
from fornax.api.server.metrics import CONTENT_TYPE
from fornax.api.server.state import AppState
from fornax.runtime.engine.messages import EngineCoreRequest
from fornax.runtime.sampling.params import SamplingParams

logger = logging.getLogger(__name__)


DEEP_HEALTH_TIMEOUT_S = 10.0
RECONNECT_WAIT_S = 2.0  # many models: a just-loaded model's engine client reconnecting
_NOT_SERVING = ("unloaded", "unloading", "loading", "sleeping", "asleep", "waking")
HEALTH_STATS_MAX_AGE_S = 1.0  # /health asks the engine at most this often per worker
HEALTH_STATS_TIMEOUT_S = 5.0


async def health(req: Request) -> Response:
    """200 while the engine core runs and makes progress; 503 once it is dead, while the server
    drains (SIGTERM), or when its busy loop has not come round for --engine-stall-timeout
    seconds (the watchdog). The engine's answer is cached for a second, so /health stays cheap.

    `?deep=1` (fornax's) also runs a one-token generation, which must finish within 10 s.
    """
    return await _health(req, req.query.get("deep", ["0"])[-1].lower() in ("1", "true", "yes"))


async def health_generate(req: Request) -> Response:
    """SGLang's GET /health_generate: /health plus a one-token generation through the engine
    (one pooling forward or transcription window on those models); 200, else 503."""
    return await _health(req, True)


async def _health(req: Request, deep: bool) -> Response:
    models = req.state.models
    if not models.many or "model" in req.query:  # one model: this answer, as always
        return await _model_health(req.state, deep)
    failed: list[tuple[int, str]] = []  # many models (none named): 503 naming each unhealthy
    statuses = await models.model_states()  # unloaded on purpose (or loading): not a failure
    for i, (state, status) in enumerate(zip(models.states, statuses, strict=True)):
        if status in _NOT_SERVING:
            continue
        if state.engine.dead and state.engine.managed:  # loaded this moment: this worker
            with contextlib.suppress(APIError):  # reconnects within 0.5 s
                await state.engine.wait_alive(RECONNECT_WAIT_S)
        try:
            await _model_health(state, deep)
        except APIError as exc:
            failed.append((i, f"model {state.model_name}: {exc.message}"))
    if failed:  # one that was unloaded meanwhile (idle, keep_alive 0, evicted) did not fail
        statuses = await models.model_states()
        failed = [(i, why) for i, why in failed if statuses[i] not in _NOT_SERVING]
    if failed:
        raise APIError(503, "; ".join(why for _, why in failed), headers={"retry-after": "5"})
    return Response(b"", 200, content_type=None)


async def _model_health(state: AppState, deep: bool) -> Response:
    if state.engine.dead:
        raise EngineDeadError(state.engine.dead_reason or "the engine core is not running")
    if state.draining:
        raise APIError(503, "the server is shutting down")
    try:
        stats = await state.engine.recent_stats(HEALTH_STATS_MAX_AGE_S, HEALTH_STATS_TIMEOUT_S)
    except APIError as exc:  # no answer in time (or dead meanwhile): not healthy
        raise APIError(503, f"the engine core does not answer: {exc.message}") from None
    if stats.draining:
        raise APIError(503, "the server is shutting down (draining in-flight requests)")
    limit = state.settings.engine_stall_timeout_s
    if limit and stats.loop_stall_s >= limit:
        raise APIError(503, f"the engine core has made no progress for {stats.loop_stall_s:.0f} s"
                       f" (--engine-stall-timeout {limit:g})")
    if deep:
        if is_pooling(state):  # a pooling model cannot generate: one pooling forward instead
            await _probe(state, pooling_probe(state), "a pooling forward")
        elif is_transcription(state):  # Whisper: one window of silence, one token
            await _probe(state, transcription_probe(state), "one transcription window")
        else:
            prompt = state.tokenizer.encode("ping", add_special_tokens=False) or [0]
            params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                    detokenize=False)
            await _probe(state, EngineCoreRequest(f"health-{uuid.uuid4().hex}", prompt, params),
                         "a one-token generation")
    return Response(b"", 200, content_type=None)


async def _probe(state: AppState, request: EngineCoreRequest, what: str) -> None:
    """Run one engine request to its end within DEEP_HEALTH_TIMEOUT_S (else 503); it counts in
    no request metric."""
    group = await state.engine.add([request])

    async def run() -> None:
        while not group.finished:
            await group.next()

    try:
        await asyncio.wait_for(run(), DEEP_HEALTH_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise APIError(503, f"{what} took over {DEEP_HEALTH_TIMEOUT_S:.0f} s") from None
    finally:
        await state.engine.release(group)


async def ping(req: Request) -> Response:
    return await health(req)


async def version(req: Request) -> Response:
    return json_response({"version": req.state.settings.version})


async def load(req: Request) -> Response:
    stats = await req.state.engine.stats()
    return json_response({
        "server_load": stats.num_running + stats.num_waiting,
        "num_requests_running": stats.num_running,
        "num_requests_waiting": stats.num_waiting,
        "kv_cache_usage_perc": stats.kv_usage,
        "runner": req.state.engine_info.runner,  # generate, pooling or transcription
    })


async def metrics(req: Request) -> Response:
    models = req.state.models
    states = models.states if models.many and "model" not in req.query else [req.state]
    engines = []
    for state in states:  # every model's engine numbers, under its own model_name
        if state.engine.dead and state.engine.managed:
            continue  # not loaded (or restarting): no engine to ask
        try:
            engines.append((state.model_name, await state.engine.stats(timeout_s=2.0),
                            state.settings.cache_config_info))
        except APIError as exc:
            logger.warning("/metrics without %s's engine numbers: %s", state.model_name,
                           exc.message)
    return Response(models.primary.metrics.render_models(engines, models.many), 200,
                    content_type=CONTENT_TYPE)
