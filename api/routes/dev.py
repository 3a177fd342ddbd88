"""Dev-mode admin routes: /sleep, /wake_up, /is_sleeping, /reset_prefix_cache (API workers).

Served only with `--enable-dev-endpoints` (the app answers 404 otherwise). Each route is one
AdminCommand round trip to the engine core, which runs it between two steps. While the engine
sleeps it refuses generation requests with 503; `/health` stays 200 as in vLLM (a server put to
sleep on purpose must not be restarted by its orchestrator) and `/health?deep=1` is 503.
"""

from __future__ import annotations

import logging

from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, json_response
from fornax.runtime.engine.messages import AdminResult

logger = logging.getLogger(__name__)


def _check(result: AdminResult) -> None:
    if result.status != 200:
        raise APIError(result.status, result.message)


def _level(req: Request) -> int:
    raw = req.query.get("level", ["1"])[-1]
    if raw not in ("1", "2"):
        raise APIError(400, f"level must be 1 or 2, got {raw!r}", "level")
    return int(raw)


async def sleep(req: Request) -> Response:
    """POST /sleep?level=1|2: level 1 drops the KV cache (weights offloaded to host memory on a
    GPU), level 2 drops the weights too (reloaded from disk on wake-up)."""
    level = _level(req)
    with req.state.metrics.sleep_operation("sleep"):
        result = await req.state.engine.admin("sleep", level)
    _check(result)
    logger.info("the engine is asleep (level %d)", level)
    return Response(b"", 200, content_type=None)


async def wake_up(req: Request) -> Response:
    """POST /wake_up: restore weights and an empty KV cache (vLLM's partial `tags` are refused)."""
    tags = req.query.get("tags")
    if tags and set(tags) != {"weights", "kv_cache"}:
        raise APIError(400, "partial wake-up (tags) is not supported: omit tags to wake up the "
                       "weights and the KV cache together", "tags")
    with req.state.metrics.sleep_operation("wake"):
        result = await req.state.engine.admin("wake_up")
    _check(result)
    return Response(b"", 200, content_type=None)


async def is_sleeping(req: Request) -> Response:
    result = await req.state.engine.admin("is_sleeping", timeout_s=30.0)
    _check(result)
    return json_response({"is_sleeping": result.is_sleeping})


async def reset_prefix_cache(req: Request) -> Response:
    """POST /reset_prefix_cache: forget every cached block (409 while requests hold blocks)."""
    result = await req.state.engine.admin("reset_prefix_cache", timeout_s=30.0)
    _check(result)
    return Response(b"", 200, content_type=None)
