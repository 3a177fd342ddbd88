"""Test helper: run the real `fornax serve` as a subprocess on a free port and talk to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from fornax.runtime import env

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEYS = ("test-key-1", "test-key-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_path(arch: str = "llama") -> Path:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tools.make_tiny_model import tiny_model_dir

    return tiny_model_dir(arch)


class ServerProcess:
    """One `fornax serve` subprocess; its output goes to a log file shown on failure."""

    def __init__(self, model: str | None, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fornax.api.cli", "serve"]
        if model is not None:
            cmd.append(model)
        self._cmd = [*cmd, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self._start()

    def _start(self) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="fornax-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self._cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self._env, cwd=str(REPO_ROOT))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fornax serve exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # ~60 servers start per run: each waits half a poll on average
        self.stop()
        raise RuntimeError(f"fornax serve did not become healthy:\n{self.log()}")

    def restart(self, timeout_s: float = 120.0) -> ServerProcess:
        """Stop the process and start the same command again on the same port (clients made
        for this server keep working once it is ready)."""
        self.stop()
        self._start()
        return self.wait_ready(timeout_s)

    def engine_pid(self) -> int:
        """The engine-core child process (found by its command line)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in children:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"fornax.runtime.engine.process" in cmdline:
                return int(pid)
        raise RuntimeError("no engine-core child process")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if not env.KEEP_TEST_LOGS.get():
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode


@contextmanager
def serving(model: str | None, *args: str, timeout_s: float = 120.0,
            env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A ready server for the body of a `with` (a fixture's yield); stopped afterwards."""
    server = ServerProcess(model, *args, env=env)
    try:
        yield server.wait_ready(timeout_s)
    finally:
        server.stop()


# The servers shared by several test modules (session fixtures in tests/api/conftest.py).
# main: tiny llama with keys, aliases, 2 workers, CORS, small limits.
MAIN_ARGS = ("--api-key", *API_KEYS, "--served-model-name", "tiny", "tiny-alias",
             "--max-model-len", "512", "--api-server-count", "2",
             "--allowed-origins", "http://good.example", "--max-request-body-bytes", "1MiB",
             "--seed", "0", "--dtype", "float32")  # offline references here run float32
# surfaces (dev endpoints and Responses): no key, dev endpoints on, a 64 MiB KV cache (so
# sleeping frees a visible amount), 2 workers sharing a SQLite responses store (appended).
SURFACES_KV_MIB = 64
SURFACES_ARGS = ("--served-model-name", "tiny", "--max-model-len", "512",
                 "--api-server-count", "2", "--enable-dev-endpoints",
                 "--kv-cache-memory", f"{SURFACES_KV_MIB}MiB")
# cross (tests/api/conftest.py cross_server): the tiny BERT cross-encoder in float32, since the
# pooling tests compare its scores with float32 references to 1e-5.
CROSS_ARGS = ("--served-model-name", "tiny-cross", "--dtype", "float32")


def auth(key: str = API_KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sse_events(text: str) -> list[Any]:
    """Parse an SSE body into JSON events, with the final '[DONE]' kept as a string."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block.startswith("data: "):
            continue
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def open_stream(port: int, body: dict, key: str | None = API_KEYS[0]) -> socket.socket:
    """A raw HTTP/1.1 streaming completion; returns once the first SSE event has arrived."""
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n")
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + b"\r\n" + payload)
    got = b""
    while b"data: " not in got:
        data = sock.recv(4096)
        assert data, got
        got += data
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    return sock


def read_to_done(sock: socket.socket) -> bytes:
    """The rest of an open stream, up to its `data: [DONE]` or until the server closes; closed."""
    rest = b""
    while b"data: [DONE]" not in rest:
        data = sock.recv(65536)
        if not data:
            break
        rest += data
    sock.close()
    return rest


def post_concurrently(url: str, n: int, body: dict, path: str = "/v1/completions"
                      ) -> list[tuple[float, httpx.Response]]:
    """n concurrent POSTs of the same body: (seconds until its answer, answer) for each."""
    results: list[tuple[float, httpx.Response]] = []
    start = time.monotonic()

    def one() -> None:
        r = httpx.post(url + path, json=body, timeout=120)
        results.append((time.monotonic() - start, r))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def raw_request(port: int, request: bytes, timeout_s: float = 10.0) -> bytes:
    """Send raw bytes over a TCP socket and read the answer until the server closes or pauses."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False
