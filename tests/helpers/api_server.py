"""Test helper: run the real `fornax serve` as a subprocess on a free port and talk to it."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
        self.log_path = Path(tempfile.mkstemp(prefix="fornax-serve-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "fornax.api.cli", "serve"]
        if model is not None:
            cmd.append(model)
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=str(REPO_ROOT))

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
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"fornax serve did not become healthy:\n{self.log()}")

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


_shared: dict[str, ServerProcess] = {}


def shared_server(key: str, model: str | None, *args: str, timeout_s: float = 120.0
                  ) -> ServerProcess:
    """One server per key for the whole test session (test modules share it); stopped at exit."""
    server = _shared.get(key)
    if server is None or server.proc.poll() is not None:
        server = ServerProcess(model, *args).wait_ready(timeout_s)
        _shared[key] = server
    return server


@atexit.register
def _stop_all() -> None:
    for server in _shared.values():
        server.stop(timeout_s=10)


def main_server() -> ServerProcess:
    """The tiny-llama server most API tests use: keys, aliases, 2 workers, CORS, small limits."""
    return shared_server(
        "main", str(tiny_model_path("llama")), "--api-key", *API_KEYS,
        "--served-model-name", "tiny", "tiny-alias", "--max-model-len", "512",
        "--api-server-count", "2", "--allowed-origins", "http://good.example",
        "--max-request-body-bytes", "1MiB", "--seed", "0")


SURFACES_KV_MIB = 64
SURFACES_DB = Path(tempfile.gettempdir()) / f"fornax-test-responses-{os.getpid()}.db"


def surfaces_server() -> ServerProcess:
    """The tiny-llama server of the dev-endpoint and Responses tests: no API key, dev endpoints
    on, a 64 MiB KV cache (so sleeping frees a visible amount), and a SQLite responses store that
    its 2 workers share and that a restarted server (same call after stop()) finds again."""
    return shared_server(
        "surfaces", str(tiny_model_path("llama")), "--served-model-name", "tiny",
        "--max-model-len", "512", "--api-server-count", "2", "--enable-dev-endpoints",
        "--kv-cache-memory", f"{SURFACES_KV_MIB}MiB", "--responses-store", f"sqlite:{SURFACES_DB}")


@atexit.register
def _remove_surfaces_db() -> None:
    server = _shared.get("surfaces")
    if server is not None:
        server.stop(timeout_s=10)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{SURFACES_DB}{suffix}").unlink(missing_ok=True)


def thinker_server() -> ServerProcess:
    """test_api_tools' thinking model (the tiny llama with Qwen3's <think> and <tool_call> tokens
    and a template that thinks and takes tools) with the hermes tool parser and the qwen3
    reasoning parser; shared by the tool-calling and reasoning tests of every surface."""
    server = _shared.get("thinker")
    if server is not None and server.proc.poll() is None:
        return server
    from test_api_tools import thinker_model

    root = Path(tempfile.mkdtemp(prefix="fornax-thinker-"))
    atexit.register(shutil.rmtree, root, True)
    return shared_server("thinker", thinker_model(root), "--max-model-len", "1024", "--seed", "0",
                         "--chat-template", str(root / "template.jinja"),
                         "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                         "--reasoning-parser", "qwen3", "--served-model-name", "thinker")


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
