"""Operational routes: /health, /ping, /version, /load, /metrics (API workers)."""

from __future__ import annotations

import logging

import msgspec

from fornax.api.errors import APIError, EngineDeadError
from fornax.api.http import Request, Response, json_response
from fornax.api.metrics import CONTENT_TYPE

logger = logging.getLogger(__name__)


async def health(req: Request) -> Response:
    """200 while the engine core runs; 503 once it is dead or the server is shutting down."""
    state = req.state
    if state.engine.dead:
        raise EngineDeadError(state.engine.dead_reason or "the engine core is not running")
    if state.draining:
        raise APIError(503, "the server is shutting down")
    return Response(b"", 200, content_type=None)


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
    })


async def metrics(req: Request) -> Response:
    state = req.state
    stats = None
    try:
        stats = await state.engine.stats(timeout_s=2.0)
    except APIError as exc:
        logger.warning("/metrics without engine numbers: %s", exc.message)
    return Response(state.metrics.render(stats), 200, content_type=CONTENT_TYPE)


def to_json(obj: object) -> bytes:
    return msgspec.json.encode(obj)
