"""`WS /v1/realtime` through the Ray application: the ingress asks one replica of the speech model
for its child's address and relays frames both ways (Ray Serve ingress replica).

The child listens on its node's localhost, so a session is relayed when that replica runs on the
ingress's node; otherwise the session is closed with 1013 (try again) and a reason. A session
does not count as one of the replica's ongoing requests (Ray sees only the `describe` call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import WebSocket
from ray.serve.handle import DeploymentHandle

logger = logging.getLogger(__name__)

_PASSED_HEADERS = ("authorization", "x-api-key", "origin")


async def relay(websocket: WebSocket, handle: DeploymentHandle) -> None:
    """One session: connect to a replica's child, accept the client with the child's
    subprotocol, then copy frames until either side closes."""
    import ray
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus, WebSocketException

    info = await handle.describe.remote()
    if info["node_id"] != ray.get_runtime_context().get_node_id():
        await websocket.close(1013, "the speech model's replica runs on another node; the "
                              "realtime relay reaches replicas of the ingress's node only")
        return
    query = websocket.url.query
    url = "ws" + info["url"][len("http"):] + "/v1/realtime" + (f"?{query}" if query else "")
    headers = [(k, v) for k, v in websocket.headers.items() if k.lower() in _PASSED_HEADERS]
    protocols: Any = websocket.scope.get("subprotocols") or None
    try:
        upstream = await connect(url, additional_headers=headers, subprotocols=protocols,
                                 max_size=None, open_timeout=10)
    except InvalidStatus as exc:
        code = exc.response.status_code
        await websocket.close(1008 if code in (401, 403) else 1011, f"refused ({code})")
        return
    except (OSError, WebSocketException, asyncio.TimeoutError) as exc:
        logger.warning("realtime relay: cannot reach %s: %r", url, exc)
        await websocket.close(1011, "the speech model's replica is not reachable")
        return
    await websocket.accept(subprotocol=upstream.subprotocol)

    async def client_to_child() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(message.get("code") or 1000)
                return
            data = message.get("text")
            await upstream.send(data if data is not None else message.get("bytes") or b"")

    async def child_to_client() -> None:
        with contextlib.suppress(WebSocketException):
            async for data in upstream:
                if isinstance(data, str):
                    await websocket.send_text(data)
                else:
                    await websocket.send_bytes(data)
        code = upstream.close_code or 1000
        with contextlib.suppress(RuntimeError):
            await websocket.close(code, upstream.close_reason or "")

    tasks = [asyncio.ensure_future(client_to_child()), asyncio.ensure_future(child_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close()
