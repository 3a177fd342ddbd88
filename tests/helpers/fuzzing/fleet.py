"""The fuzzed servers: one real `fornax serve` per server kind, their liveness, engine pids, RSS
and the engine's leftovers after a run (fuzzer process)."""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from helpers.api_server import ServerProcess, tiny_model_path
from helpers.fuzzing.cases import API_KEY
from helpers.fuzzing.routes import ASR, CLS, EMBED, GEN, MANY, MANY_MODELS, MODEL_NAMES

logger = logging.getLogger(__name__)
_BLOCKS_RE = re.compile(r"KV cache:? (\d+) blocks")
_ENGINE_DIED = "died (exit code"  # EngineGroup's line when a model's engine dies unasked
_TRACE_RE = re.compile(r"Traceback \(most recent call last\):\n(?:[ \t].*\n|\S.*Error.*\n?)+")


def model_for(kind: str) -> str | None:
    if kind == MANY:  # the models come with --models (server_args)
        return None
    if kind == GEN:
        return str(tiny_model_path("llama"))
    if kind == ASR:
        return "whisper-tiny.en"
    from tools.make_tiny_bert import tiny_bert_dir

    return str(tiny_bert_dir({EMBED: "bert-embed", CLS: "bert-classify"}[kind]))


def server_args(kind: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    args = ["--api-key", API_KEY, "--max-request-body-bytes", "1MiB", "--seed", "0"]
    if kind == MANY:  # "b" idles out after 2 s; keep_alive and the load/unload routes swap
        entries = [{"model": str(tiny_model_path("llama")), "served_model_name": MANY_MODELS[0],
                    "max_model_len": 256, "kv_cache_memory": "64MiB"},
                   {"model": str(tiny_model_path("qwen2")), "served_model_name": MANY_MODELS[1],
                    "max_model_len": 256, "kv_cache_memory": "64MiB", "idle_timeout": 2}]
        args += ["--models", *map(json.dumps, entries), "--api-server-count", "2"]
        return (*args, *extra)
    args += ["--served-model-name", MODEL_NAMES[kind]]
    if kind == GEN:
        args += ["--max-model-len", "256", "--api-server-count", "2",
                 "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                 "--enable-tokenizer-info-endpoint"]
    if kind == ASR:
        args += ["--max-audio-filesize-mb", "0.5", "--realtime-max-buffer-seconds", "5",
                 "--realtime-idle-timeout", "3", "--max-num-seqs", "8"]
    return (*args, *extra)


@dataclass
class Member:
    kind: str
    server: ServerProcess
    engine_pid: int
    log_offset: int = 0
    restarts: int = 0
    deaths: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url


class Fleet:
    """Starts the servers side by side; restarts one whose engine died (and counts it)."""

    def __init__(self, kinds: tuple[str, ...], extra: dict[str, tuple[str, ...]] | None = None
                 ) -> None:
        self.kinds = kinds
        self.extra = extra or {}
        self.members: dict[str, Member] = {}
        self._started: dict[str, ServerProcess] = {}

    def start(self, timeout_s: float = 300.0) -> Fleet:
        return self.launch().wait(timeout_s)

    def launch(self) -> Fleet:
        """Start every server (they load side by side); wait() for them."""
        self._started = {k: ServerProcess(model_for(k), *server_args(k, self.extra.get(k, ())))
                         for k in self.kinds}
        return self

    def wait(self, timeout_s: float = 300.0) -> Fleet:
        for kind, server in self._started.items():
            server.wait_ready(timeout_s)
            self.members[kind] = Member(kind, server, _engine_pid(kind, server))
        return self

    def stop(self) -> None:
        servers = [m.server for m in self.members.values()] or list(self._started.values())
        for server in servers:  # SIGTERM all first: they drain side by side
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in servers:
            server.stop(timeout_s=20)

    def url(self, kind: str) -> str:
        return self.members[kind].url

    def dead(self, kind: str) -> str | None:
        """Why the server of `kind` is not serving (None while it is)."""
        member = self.members[kind]
        if member.server.proc.poll() is not None:
            return f"fornax serve exited with {member.server.proc.returncode}"
        if member.kind == MANY:  # engines stop and start with loads: a death is a log line
            try:
                died = member.server.log().count(_ENGINE_DIED)
            except OSError:
                died = 0
            return f"{died} engine core(s) died" if died else None
        if not Path(f"/proc/{member.engine_pid}").exists() or _zombie(member.engine_pid):
            return f"engine core {member.engine_pid} is gone"
        return None

    def health(self, kind: str) -> int:
        try:
            return httpx.get(self.url(kind) + "/health", timeout=15).status_code
        except httpx.HTTPError:
            return -1

    def restart(self, kind: str) -> None:
        member = self.members[kind]
        member.deaths.append(self.new_log(kind)[-4000:])
        member.server.stop(timeout_s=10)
        server = ServerProcess(model_for(kind), *server_args(kind, self.extra.get(kind, ())))
        server.wait_ready(300)
        self.members[kind] = Member(kind, server, _engine_pid(kind, server), 0,
                                    member.restarts + 1, member.deaths)

    def new_log(self, kind: str) -> str:
        """The server's log written since the last call."""
        member = self.members[kind]
        try:
            text = member.server.log()
        except OSError:
            return ""
        new, member.log_offset = text[member.log_offset:], len(text)
        return new

    def rss_bytes(self, kind: str) -> int:
        """Resident memory of the server and all its children (API workers, engine core)."""
        return process_tree_rss(self.members[kind].server.proc.pid)

    def leftovers(self, kind: str, wait_s: float = 60.0) -> dict[str, float]:
        """Wait until the engine is idle; its requests and KV usage then (0 when nothing leaked;
        blocks freed into the prefix cache count as free: they are evictable)."""
        deadline = time.monotonic() + wait_s
        load: dict[str, float] = {}
        while time.monotonic() < deadline:
            r = httpx.get(self.url(kind) + "/load", headers={"authorization": f"Bearer {API_KEY}"},
                          timeout=15)
            load = r.json()
            if load["server_load"] == 0 and load["kv_cache_usage_perc"] == 0:
                break
            time.sleep(0.5)
        try:
            blocks = _BLOCKS_RE.findall(self.members[kind].server.log())
        except OSError:
            blocks = []
        total = int(blocks[0]) if blocks else 0
        return {"requests": load.get("server_load", -1),
                "kv_cache_usage_perc": load.get("kv_cache_usage_perc", -1.0),
                "kv_blocks_total": total,
                "leaked_blocks": round(load.get("kv_cache_usage_perc", 0.0) * total)}


def _engine_pid(kind: str, server: ServerProcess) -> int:
    return 0 if kind == MANY else server.engine_pid()  # MANY: its engines come and go


def tracebacks(log: str) -> list[str]:
    return [m.group(0).strip() for m in _TRACE_RE.finditer(log)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def process_tree_rss(root: int) -> int:
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return total
