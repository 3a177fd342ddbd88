"""Servers a bench starts itself: launch, wait for /health, stop; resident memory (CLI process)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 600.0  # a first GGUF load prepares (dequantizes/repacks) the file: minutes
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ManagedServer:
    """One server subprocess on 127.0.0.1, its output in a log file; a context manager that
    stops it (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) on exit."""

    def __init__(self, name: str, cmd: Sequence[str], port: int,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        fd, log = tempfile.mkstemp(prefix=f"fornax-bench-{name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        self.start_s = 0.0
        logger.info("starting %s: %s (log %s)", name, " ".join(self.cmd), self.log_path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            wait_healthy(self.url, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - started

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", self.name, STOP_TIMEOUT_S)
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> ManagedServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def wait_healthy(url: str, proc: subprocess.Popen[Any], log_path: Path,
                 timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Poll GET url/health until it answers 200; RuntimeError (with the log's tail) when the
    process exits first or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout:.0f} s")


# ---- resident memory (Linux /proc; None elsewhere) ---------------------------------------------
_RSS_FIELDS = {"VmRSS": "rss_bytes", "RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes",
               "RssShmem": "rss_shmem_bytes"}


def rss_detail(pid: int) -> dict[str, int]:
    """VmRSS and its split (anonymous, file-backed such as an mmap'ed model file, shared memory)
    of one process in bytes; {} when unknown."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in _RSS_FIELDS:
                out[_RSS_FIELDS[key]] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def rss_bytes(pid: int) -> int | None:
    """Resident set size of one process (VmRSS), or None when unknown."""
    return rss_detail(pid).get("rss_bytes")


def engine_pids(server_pid: int, model: str | None = None) -> list[int]:
    """The engine-core processes of a `fornax serve` (its children running the engine); with
    `model`, only those of that model (named in the engine's environment)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != server_pid:
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes() if model else b""
        except (OSError, ValueError, IndexError):
            continue
        if b"fornax.runtime.engine.process" in cmdline and (not model
                                                             or model.encode() in environ):
            found.append(int(entry))
    return found


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), by /proc's parent links."""
    parents = _parent_map()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids = sorted(p for p, pp in parents.items() if pp == parent)
        found += kids
        frontier += kids
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def process_tree_memory(pid: int, engine_marker: str | None = None) -> dict[str, Any]:
    """RSS of `pid` and each process below it; `engine_rss_bytes` is the RSS of the first one whose
    command line contains `engine_marker` (else of `pid` itself)."""
    procs: list[dict[str, Any]] = [
        {"pid": p, "cmd": cmdline(p)[:200], "rss_bytes": None, **rss_detail(p)}
        for p in [pid, *descendants(pid)]]
    engine = next((p for p in procs if engine_marker and engine_marker in str(p["cmd"])),
                  procs[0])
    return {"engine_pid": engine["pid"], "engine_rss_bytes": engine["rss_bytes"],
            "processes": procs}
