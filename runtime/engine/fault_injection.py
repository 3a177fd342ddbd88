"""Test-only fault injection at the engine's per-request stages (engine-core process / offline LLM).

TEST-ONLY. Never set this in production: it makes the engine fail requests on purpose, so tests
can prove that a failure while serving one request fails that request alone (and that a failure
of a whole step fails only that step's requests).

Turn it on with the environment variable ``FORNAX_FAULT_INJECTION`` (read once at import, so set
it before the engine-core process starts) or, in-process, with :func:`configure`. Its value is a
JSON object:

    {"stage": "sample", "request_id_contains": "boom", "error": "RuntimeError", "times": 1}

- ``stage`` (required): one of ``STAGES`` - ``input`` (the engine-core process's input thread
  taking a request from a worker), ``admit`` (add_request), ``schedule`` (the
  scheduler's per-request pass), ``prepare`` (a request's sampling state as it joins the runner's
  batch), ``grammar`` (advancing a request's output grammar), ``sample`` (a request's row of the
  sampled batch), ``stop_check``, ``output`` (building its EngineCoreOutput), and ``step``, which
  raises for the whole batch (before the forward) whenever a matching request is scheduled.
  ``stall`` raises nothing: the engine-core busy loop sleeps ``seconds`` once for each matching
  request in the engine (the liveness watchdog's test).
- ``request_id_contains``: only requests whose id contains this text (default: every request).
- ``error``: ``RuntimeError`` (default, a bug: 500), ``ValueError`` or ``RequestError`` (the
  request's fault: 400).
- ``times``: fire at most this many times (default: unlimited).
- ``skip``: let each matching request pass the stage this many times first (``{"stage":
  "sample", "skip": 3}`` fails a request after it streamed 3 tokens).

When the variable is unset, :data:`INJECTOR` is None and every call site costs one module
attribute check (``if fault_injection.INJECTOR is not None``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

from fornax.runtime import env
from fornax.runtime.errors import RequestError

logger = logging.getLogger(__name__)

ENV_VAR = env.FAULT_INJECTION.name
STAGES = ("input", "admit", "schedule", "prepare", "grammar", "sample", "stop_check", "output",
          "step", "stall")
_ERRORS: dict[str, type[Exception]] = {"RuntimeError": RuntimeError, "ValueError": ValueError,
                                       "RequestError": RequestError}


class InjectedFault(RuntimeError):
    """The RuntimeError a fault injection raises by default."""


@dataclass
class FaultInjector:
    """Raises at one stage for the requests whose id contains `request_id_contains`."""

    stage: str
    request_id_contains: str = ""
    error: str = "RuntimeError"
    times: int | None = None
    seconds: float = 0.0  # the `stall` stage: how long the busy loop sleeps
    skip: int = 0  # passes of the stage each matching request gets before it fails

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"{ENV_VAR}: unknown stage {self.stage!r} (one of {STAGES})")
        if self.error not in _ERRORS:
            raise ValueError(f"{ENV_VAR}: unknown error {self.error!r} (one of {list(_ERRORS)})")
        self._lock = threading.Lock()
        self._stalled: set[str] = set()  # the `stall` stage fires once per request
        self._passes: dict[str, int] = {}  # request id -> passes so far (with `skip`)

    def matches(self, request_id: str) -> bool:
        return self.request_id_contains in request_id

    def check(self, stage: str, request_id: str) -> None:
        """Raise if this stage and request are the target (and firings are left)."""
        if stage != self.stage or not self.matches(request_id):
            return
        with self._lock:
            if self.skip:
                passes = self._passes.get(request_id, 0)
                if passes < self.skip:
                    self._passes[request_id] = passes + 1
                    return
            if self.times is not None:
                if self.times <= 0:
                    return
                self.times -= 1
        message = f"injected fault at stage {stage!r} for request {request_id}"
        logger.warning("%s (%s is set: test-only)", message, ENV_VAR)
        if self.error == "RuntimeError":
            raise InjectedFault(message)
        if self.error == "RequestError":
            raise RequestError(message, "fault_injection")
        raise _ERRORS[self.error](message)

    def stall(self, request_ids: list[str]) -> None:
        """The `stall` stage: sleep the busy loop once for each matching request (each firing
        counts against `times`)."""
        if self.stage != "stall":
            return
        fresh = [rid for rid in request_ids if self.matches(rid) and rid not in self._stalled]
        if not fresh:
            return
        self._stalled.update(fresh)
        with self._lock:
            if self.times is not None:
                if self.times <= 0:
                    return
                self.times -= 1
        logger.warning("injected stall of %.1f s (%s is set: test-only)", self.seconds, ENV_VAR)
        time.sleep(self.seconds)

    def check_batch(self, request_ids: list[str]) -> None:
        """The `step` stage: raise once for the batch if any scheduled request matches."""
        if self.stage != "step":
            return
        for rid in request_ids:
            if self.matches(rid):
                self.check("step", rid)
                return


def parse(text: str) -> FaultInjector:
    spec = json.loads(text)
    if not isinstance(spec, dict):
        raise ValueError(f"{ENV_VAR} must be a JSON object")
    return FaultInjector(**spec)


def configure(spec: dict | None) -> None:
    """Set (or with None, clear) the injector in this process; for tests."""
    global INJECTOR
    INJECTOR = None if spec is None else FaultInjector(**spec)


INJECTOR: FaultInjector | None = parse(_spec) if (_spec := env.FAULT_INJECTION.get()) else None
