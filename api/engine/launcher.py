"""Starts the engine-core process, waits for its READY, watches it (`fornax serve` process)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from fornax.runtime.engine.addresses import handshake_address
from fornax.runtime.engine.messages import EngineHandshake, EngineSpec
from fornax.runtime.engine.process import SPEC_ENV

logger = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The engine core could not start (bad model, bad config, crash while loading)."""


class EngineLauncher:
    """One engine-core subprocess with its own IPC directory."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], drain_timeout_s: float) -> None:
        self.ipc_dir = tempfile.mkdtemp(prefix="fornax-")
        self.spec = EngineSpec(model=model, engine_kwargs=engine_kwargs, ipc_dir=self.ipc_dir,
                               handshake_address=handshake_address(self.ipc_dir),
                               parent_pid=os.getpid(), drain_timeout_s=drain_timeout_s)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.exit_code: int | None = None

    def start(self) -> EngineHandshake:
        """Spawn the process and block until it is READY; EngineStartError if it fails."""
        ctx: zmq.Context = zmq.Context.instance()
        pull = ctx.socket(zmq.PULL)
        pull.bind(self.spec.handshake_address)
        env = dict(os.environ)
        env[SPEC_ENV] = msgspec.json.encode(self.spec).decode()
        self.proc = subprocess.Popen([sys.executable, "-m", "fornax.runtime.engine.process"],
                                     env=env)
        try:
            while True:
                if pull.poll(500):
                    msg = msgspec.msgpack.decode(pull.recv(), type=EngineHandshake)
                    break
                rc = self.proc.poll()
                if rc is not None:
                    raise EngineStartError(f"the engine core exited with code {rc} while starting")
        except BaseException:
            self.kill()
            raise
        finally:
            pull.close(linger=0)
        if not msg.ready:
            self.proc.wait(timeout=30)
            raise EngineStartError(msg.error or "the engine core failed to start")
        return msg

    def watch(self, on_death: Callable[[int], None]) -> None:
        """Call `on_death(exit_code)` from a thread if the process ends while not stopping."""

        def wait() -> None:
            assert self.proc is not None
            rc = self.proc.wait()
            self.exit_code = rc
            if not self.stopping:
                on_death(rc)

        threading.Thread(target=wait, name="engine-watch", daemon=True).start()

    def request_drain(self) -> None:
        """SIGTERM the engine: it stops admitting, finishes or aborts in-flight work, exits."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def abort_now(self) -> None:
        """SIGUSR1: the draining engine aborts its in-flight requests now (their streams end with
        finish_reason "abort") and exits; nothing is left to wait for."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to `timeout_s` for the process to exit (a drain ends that way); its code."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float) -> int | None:
        """Drain and wait for the process; kill it after `timeout_s`. Returns its exit code."""
        self.request_drain()
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the engine core did not exit within %.0f s; killing it", timeout_s)
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
