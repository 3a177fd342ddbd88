"""`fornax serve` shutdown: SIGTERM (to the server or its whole process group) and a second signal
end in-flight streams cleanly and leave no process behind, within a bound (real server)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fornax.perf.managed_server import descendants
from helpers.api_server import REPO_ROOT, free_port, tiny_model_path
from helpers.bench import alive

pytestmark = pytest.mark.slow

# more work than the drain may take: one sequence at a time, each stream 2,000 tokens
STREAMS = 10
LONG = {"prompt": "Once upon a time", "ignore_eos": True, "temperature": 0, "max_tokens": 2000,
        "stream": True}
BOUND_S = 10.0  # a correctness bound, not a performance target


class _Server:
    """`fornax serve` in its own process group (as systemd or a Ray replica starts it)."""

    def __init__(self, *args: str, model: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(REPO_ROOT / ".cache" / f"shutdown-test-{self.port}.log")
        self.log_path.parent.mkdir(exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fornax.api.cli", "serve", model or str(tiny_model_path("llama")),
             "--host", "127.0.0.1", "--port", str(self.port), "--max-num-seqs", "1",
             "--max-num-queued-requests", "32", "--api-server-count", "2",
             "--disable-log-requests", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"not healthy:\n{self.log()}")
        self.tree = set(descendants(self.proc.pid))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def streams(self, n: int) -> tuple[list[threading.Thread], list[bytes]]:
        """n long streams in flight (each in a thread); returns once all reached the engine."""
        bodies: list[bytes] = []
        started = threading.Event()

        def one() -> None:
            got = b""
            try:
                with httpx.stream("POST", self.url + "/v1/completions", json=LONG,
                                  timeout=120) as r:
                    for chunk in r.iter_raw():
                        got += chunk
                        started.set()
            except httpx.HTTPError as exc:
                got += f"\nclient error: {exc!r}".encode()
            bodies.append(got)

        threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        assert started.wait(60), self.log()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # every stream reached the engine (or is done)
            load = httpx.get(self.url + "/load", timeout=10).json()["server_load"]
            if load + len(bodies) >= n:
                return threads, bodies
            time.sleep(0.1)
        raise AssertionError(f"the streams did not reach the engine:\n{self.log()}")

    def close(self) -> None:
        for pid in [self.proc.pid, *self.tree]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def assert_gone_within(self, seconds: float, started: float) -> int:
        """The server exits and every process it started is gone within `seconds`."""
        code = self.proc.wait(timeout=seconds)
        while any(alive(p) for p in self.tree) and time.monotonic() - started < seconds:
            time.sleep(0.05)
        left = [p for p in self.tree if alive(p)]
        assert not left, f"left behind: {left}\n{self.log()}"
        assert time.monotonic() - started < seconds, self.log()
        return code


def _finish_reasons(bodies: list[bytes]) -> list[str]:
    """Each stream's last finish_reason; every stream must end with `data: [DONE]`."""
    reasons = []
    for body in bodies:
        text = body.decode(errors="replace")
        assert text.rstrip().endswith("data: [DONE]"), text[-300:]
        events = [json.loads(line[6:]) for line in text.splitlines()
                  if line.startswith("data: {")]
        reasons.append(next(c["finish_reason"] for e in reversed(events)
                            for c in e["choices"] if c["finish_reason"]))
    return reasons


@pytest.mark.parametrize("group", [False, True], ids=["server", "process-group"])
def test_sigterm_with_streams_in_flight_ends_the_whole_tree_promptly(group):
    """With more work in flight than --shutdown-timeout's default allows, SIGTERM ends every
    stream with [DONE] ("length" or "abort"), exits 0 and leaves no process, within the bound;
    sent to the whole group (Ctrl-C, systemd, a Ray replica) the API workers get it too."""
    server = _Server()
    try:
        assert len(server.tree) >= 3, server.tree  # the engine core and two API workers
        threads, bodies = server.streams(STREAMS)
        started = time.monotonic()
        if group:
            os.killpg(server.proc.pid, signal.SIGTERM)
        else:
            server.proc.send_signal(signal.SIGTERM)
        assert server.assert_gone_within(BOUND_S, started) == 0, server.log()
        for t in threads:
            t.join(BOUND_S)
        assert len(bodies) == STREAMS
        reasons = _finish_reasons(bodies)
        # the drain gave up on what was still queued: proof that it was bounded
        assert "abort" in reasons and set(reasons) <= {"length", "abort"}, reasons
    finally:
        server.close()


def test_a_second_signal_aborts_in_flight_requests_at_once():
    """--shutdown-timeout 120 would wait; a second SIGTERM aborts what runs now: every stream
    ends with [DONE], at least one with "abort", and the tree is gone within the bound."""
    server = _Server("--shutdown-timeout", "120")
    try:
        threads, bodies = server.streams(STREAMS)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        assert server.assert_gone_within(BOUND_S, started) == 0, server.log()
        for t in threads:
            t.join(BOUND_S)
        reasons = _finish_reasons(bodies)
        assert "abort" in reasons and set(reasons) <= {"length", "abort"}, reasons
        assert "aborting in-flight requests now" in server.log()
    finally:
        server.close()


def test_ctrl_c_right_after_start_ends_the_whole_tree_promptly():
    """`fornax serve`, then Ctrl-C (SIGINT to the process group) while the engine still warms up
    its grammar compiler in the background: exit 0, no process left, within the bound."""
    server = _Server()
    try:
        started = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGINT)
        assert server.assert_gone_within(BOUND_S, started) == 0, server.log()
    finally:
        server.close()


async def _goodbyes(url: str, queries: list[str], signal_server) -> list[tuple[dict, int | None]]:
    """Open one realtime session per query (audio sent on each), signal the server, and return
    each session's last event and the close code it got."""
    import websockets

    async def session(query: str, opened: asyncio.Event) -> tuple[dict, int | None]:
        async with websockets.connect(url + query, proxy=None, open_timeout=30) as ws:
            json.loads(await asyncio.wait_for(ws.recv(), 30))  # (transcription_)session.created
            if not query:
                await ws.send(json.dumps({"type": "session.update", "model": "whisper-tiny.en"}))
            silence = base64.b64encode(bytes(3200)).decode()  # 100 ms of 16 kHz PCM16
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))
            opened.set()
            last: dict = {}
            with contextlib.suppress(websockets.ConnectionClosedOK):
                while True:  # ConnectionClosedError (no close frame) fails the test
                    last = json.loads(await asyncio.wait_for(ws.recv(), 2 * BOUND_S))
            return last, ws.close_code

    events = [asyncio.Event() for _ in queries]
    tasks = [asyncio.ensure_future(session(q, e)) for q, e in zip(queries, events, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
    signal_server()
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize("group", [False, True], ids=["server", "process-group"])
def test_sigterm_closes_realtime_sessions_with_going_away(group):
    """Open WS /v1/realtime sessions (vLLM's protocol and OpenAI's transcription session) get
    the protocol's error event (server_shutting_down) and a close with 1001 when the server gets
    SIGTERM, not a cut connection; the server exits 0 within the bound."""
    from helpers.whisper_fixtures import packaged_whisper

    packaged_whisper("whisper-tiny.en")  # `make install` installs it: fails when missing
    server = _Server("--api-server-count", "1", model="whisper-tiny.en")
    try:
        url = server.url.replace("http://", "ws://") + "/v1/realtime"
        started = [0.0]

        def signal_server() -> None:
            started[0] = time.monotonic()
            if group:
                os.killpg(server.proc.pid, signal.SIGTERM)
            else:
                server.proc.send_signal(signal.SIGTERM)

        results = asyncio.run(_goodbyes(url, ["", "?intent=transcription"], signal_server))
        assert server.assert_gone_within(BOUND_S, started[0]) == 0, server.log()
        (vllm, vllm_code), (openai_event, openai_code) = results
        assert vllm_code == 1001 and openai_code == 1001, (results, server.log())
        assert vllm["type"] == "error" and vllm["code"] == "server_shutting_down", vllm
        assert openai_event["type"] == "error", openai_event
        assert openai_event["error"]["code"] == "server_shutting_down", openai_event
        assert openai_event["error"]["type"] == "server_error", openai_event
    finally:
        server.close()
