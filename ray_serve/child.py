"""One replica's `fornax serve` child process: start it on a free localhost port, wait for its
/health, watch it, stop it with its whole process group (Ray Serve replica process)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml  # type: ignore[import-untyped]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_START_TRIES = 3  # a port taken between picking it and the child's bind: try another


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child before exec: a new process group (stopped as one), and SIGTERM when the
    replica's process dies, however it dies (Linux; elsewhere the group kill in stop() only)."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildServer:
    """A `fornax serve --config FILE` process serving one model on 127.0.0.1."""

    def __init__(self, config: dict[str, Any], host: str = "127.0.0.1") -> None:
        self.config = dict(config)
        self.host = host
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._folder = tempfile.TemporaryDirectory(prefix="fornax-replica-")
        self.log_path = Path(self._folder.name) / "serve.log"
        self._config_path = Path(self._folder.name) / "serve.yaml"
        self._config_path.write_text(yaml.safe_dump(self.config, sort_keys=False),
                                     encoding="utf-8")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _spawn(self) -> None:
        self.port = free_port(self.host)
        cmd = [sys.executable, "-m", "fornax.api.cli", "serve", "--config",
               str(self._config_path), "--host", self.host, "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        logger.info("started fornax serve (pid %d) on %s", self.proc.pid, self.url)

    async def start(self, timeout_s: float) -> None:
        """Start the child and wait until its /health answers 200 (RuntimeError with the end
        of its log if it exits or stays unhealthy)."""
        deadline = time.monotonic() + timeout_s
        for attempt in range(_START_TRIES):
            self._spawn()
            if await self._wait_healthy(deadline):
                return
            address_taken = "address already in use" in self.log_tail().lower()
            self.stop()
            if not address_taken or attempt + 1 == _START_TRIES:
                break
        raise RuntimeError(f"fornax serve did not become healthy:\n{self.log_tail()}")

    async def _wait_healthy(self, deadline: float) -> bool:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.url + "/health")).status_code == 200:
                        return True
                await asyncio.sleep(0.2)
        return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the child's process group (fornax serve drains and stops its engine), then
        SIGKILL to whatever is left after `timeout_s`."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("fornax serve (pid %d) did not stop in %.0f s: killed", proc.pid,
                           timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # engine or workers left behind, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        self._folder.cleanup()
