"""A replica of one model's deployment: runs a `fornax serve` child and forwards requests to it,
streaming the answer back through Ray Serve (Ray Serve replica process).

Every route, check and limit is the child's: the replica only carries bytes. The first item a
`forward` call yields is the answer's head (`Head`), then the body's chunks as they arrive.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from fornax.ray_serve.child import ChildServer

logger = logging.getLogger(__name__)

LOAD_METRIC = "fornax_engine_load"  # running + waiting requests of the child's engine
# hop-by-hop and framing headers: each side of the relay sets its own
_DROP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length",
                   "te", "upgrade", "proxy-connection", "trailer",
                   "date", "server", "x-request-id"})  # Ray's proxy sets these three


def head(status: int, headers: list[tuple[str, str]], replica: str, *,
         unsent: bool = False) -> dict[str, Any]:
    """An answer's head: `unsent` says the request never reached an engine (safe to retry)."""
    return {"status": status, "headers": headers, "replica": replica, "unsent": unsent}


def kept_headers(headers: Any) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in _DROP]


def wire_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """The client's headers as sent (the ingress's ASGI server decoded them as latin-1; httpx
    would encode str values as ASCII and fail on any other byte)."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class ModelReplica:
    """The Ray Serve deployment class of one model (app.py applies the deployment options)."""

    # Ray Serve awaits an async constructor (the child starts without blocking the replica)
    async def __init__(  # type: ignore[misc]
            self, child_config: dict[str, Any], startup_timeout_s: float) -> None:
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        key = child_config.get("api_key")
        first = key[0] if isinstance(key, list) and key else key
        self._auth = {"authorization": f"Bearer {first}"} if isinstance(first, str) else {}
        self.child = ChildServer(child_config)
        try:
            await self.child.start(startup_timeout_s)
        except BaseException:
            self.child.close()
            raise
        self.client = httpx.AsyncClient(base_url=self.child.url,
                                        timeout=httpx.Timeout(None, connect=5.0),
                                        limits=httpx.Limits(max_connections=None,
                                                            max_keepalive_connections=64))
        logger.info("replica %s serves through fornax serve pid %s", self.replica_id,
                    self.child.pid)

    async def forward(self, method: str, path: str, query: str,
                      headers: list[tuple[str, str]], body: bytes) -> AsyncIterator[Any]:
        """The child's answer to one request: its head, then its body's chunks."""
        if not self.child.alive():
            yield head(503, [("retry-after", "1")], self.replica_id, unsent=True)
            return
        url = path + (f"?{query}" if query else "")
        request = self.client.build_request(method, url, headers=wire_headers(headers),
                                            content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.ConnectError:  # the child is gone: this request never reached it
            yield head(503, [("retry-after", "1")], self.replica_id, unsent=True)
            return
        except httpx.TransportError as exc:
            logger.warning("replica %s: %s %s failed: %r", self.replica_id, method, path, exc)
            yield head(503, [("retry-after", "1")], self.replica_id)
            return
        try:
            yield head(response.status_code, kept_headers(response.headers), self.replica_id)
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:  # the child died mid-answer: the stream ends here
            logger.warning("replica %s: %s %s cut short: %r", self.replica_id, method, path, exc)
        finally:
            await response.aclose()

    async def check_health(self) -> None:
        """Ray calls this every health_check_period_s: a dead child makes the replica unhealthy
        and Ray replaces it (its child included)."""
        if not self.child.alive():
            code = self.child.proc.returncode if self.child.proc is not None else None
            raise RuntimeError(f"fornax serve (pid {self.child.pid}) exited ({code})")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metric: the child engine's running + waiting requests (/load)."""
        try:
            reply = await self.client.get("/load", headers=self._auth, timeout=5.0)
            load = float(reply.json()["server_load"]) if reply.status_code == 200 else math.nan
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            load = math.nan
        if not math.isfinite(load):
            return {}  # no point this time (Ray keeps the others)
        return {LOAD_METRIC: load}

    async def metrics_text(self, headers: list[tuple[str, str]]) -> tuple[str, int, str]:
        """(replica id, status, the child's /metrics text) for the ingress's merged /metrics."""
        try:
            reply = await self.client.get("/metrics", headers=wire_headers(headers),
                                          timeout=10.0)
        except httpx.HTTPError as exc:
            return self.replica_id, 503, f"# replica {self.replica_id}: {exc!r}\n"
        return self.replica_id, reply.status_code, reply.text

    async def describe(self) -> dict[str, Any]:
        """This replica: its id, its child's address and node, and its engine's runner."""
        import ray

        runner = "generate"
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            reply = await self.client.get("/load", headers=self._auth, timeout=5.0)
            runner = str(reply.json().get("runner", runner))
        return {"replica": self.replica_id, "url": self.child.url, "pid": self.child.pid,
                "actor_pid": os.getpid(), "alive": self.child.alive(),
                "node_id": ray.get_runtime_context().get_node_id(), "runner": runner}

    def __del__(self) -> None:
        """Ray Serve calls this on graceful shutdown: the child stops with its replica."""
        child = getattr(self, "child", None)
        if child is not None:
            child.close()
