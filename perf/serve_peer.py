"""`bench serve` side by side: launch `fornax serve` and llama.cpp's `llama-server` itself (CLI process).

`--launch` starts `fornax serve <model> <--serve-args>` on a free port; `--peer llama.cpp` starts
`llama-server` on the same model file with the same threads, one slot per concurrent request and
prompt caching off. The bench runs fornax first, then llama.cpp, one server up at a time, and
records each engine process's resident memory after its run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from fornax.perf import llamacpp_peer
from fornax.perf.datasets import BenchRequest
from fornax.perf.managed_server import ManagedServer, free_port, process_tree_memory
from fornax.runtime import env
from fornax.runtime.cli_types import positive_int

logger = logging.getLogger(__name__)

PEERS = ("llama.cpp",)
ENGINE_MARKER = "fornax.runtime.engine.process"  # the engine core's command line
NO_PREFIX_CACHING = "--no-enable-prefix-caching"
MIB = 1 << 20
IDLE_S = 1.5  # quiet before the resident memory is read


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("side by side (servers the bench starts itself)")
    g.add_argument("--launch", action="store_true",
                   help="start `fornax serve --model-path ...` on a free port (instead of "
                        "--base-url), stop it after its run")
    g.add_argument("--model-path", default=None,
                   help="the model file both servers load (default: the packaged SmolLM2 GGUF)")
    g.add_argument("--serve-args", default="",
                   help="extra `fornax serve` flags for --launch, one string; with --peer, "
                        f"{NO_PREFIX_CACHING} is added unless prefix caching is named")
    g.add_argument("--peer", choices=PEERS, default=None,
                   help="start llama.cpp's llama-server on the same model file, threads and "
                        "workload (prompt caching off), after fornax's run")
    g.add_argument("--peer-binary", default=None,
                   help="llama-server to run (default: the one `python -m "
                        "tools.build_llama_server` built into the fornax cache)")
    g.add_argument("--peer-threads", type=positive_int, default=None,
                   help="llama-server -t and -tb (default: OMP_NUM_THREADS, else all cores)")
    g.add_argument("--peer-parallel", type=positive_int, default=None,
                   help="llama-server -np slots (default: --max-concurrency, else the prompts)")
    g.add_argument("--peer-ctx-per-request", type=positive_int, default=None,
                   help="context of one slot (default: longest prompt + output + 10%%); "
                        "-c is slots x this")
    g.add_argument("--peer-args", default="", help="extra llama-server flags, one string")


def check_args(args: argparse.Namespace, parser_error: Any) -> None:
    """Flag combinations `bench serve` refuses (argparse's exit 2, naming the flag)."""
    if args.launch and args.base_url:
        parser_error("--launch starts its own server: leave out --base-url")
    if args.peer and args.peer_base_url:
        parser_error("--peer starts its own peer server: leave out --peer-base-url")
    if args.launch and args.server_pid:
        parser_error("--launch knows its server's pid: leave out --server-pid")
    for flag in ("serve_args", "peer_args"):
        try:
            shlex.split(getattr(args, flag))
        except ValueError as exc:
            parser_error(f"--{flag.replace('_', '-')}: {exc}")


def model_path(args: argparse.Namespace) -> Path:
    """--model-path, else the packaged default GGUF (the file `fornax serve` loads by default)."""
    if args.model_path:
        path = Path(args.model_path).expanduser()
        if not path.exists():
            raise SystemExit(f"--model-path {args.model_path}: no such file or folder")
        return path
    from fornax.runtime.loaders.default_model import default_model_path

    return default_model_path()


def threads(args: argparse.Namespace) -> int:
    if args.peer_threads:
        return int(args.peer_threads)
    return env.OMP_NUM_THREADS.get() or os.cpu_count() or 1


def fornax_command(args: argparse.Namespace, model: Path, port: int) -> list[str]:
    extra = shlex.split(args.serve_args)
    if args.peer and not any("prefix-caching" in flag for flag in extra):
        extra.append(NO_PREFIX_CACHING)
    return [sys.executable, "-m", "fornax.api.cli", "serve", str(model), "--host", "127.0.0.1",
            "--port", str(port), *extra]


def start_fornax(args: argparse.Namespace) -> ManagedServer:
    port = free_port()
    return ManagedServer("fornax", fornax_command(args, model_path(args), port), port)


def start_llama(args: argparse.Namespace, requests: list[BenchRequest]
                ) -> tuple[ManagedServer, dict[str, Any]]:
    """Start llama-server for this workload; returns it and what the record says about it."""
    binary = llamacpp_peer.resolve_binary(args.peer_binary)
    model = model_path(args)
    parallel = args.peer_parallel or args.max_concurrency or len(requests)
    ctx = args.peer_ctx_per_request or llamacpp_peer.per_request_ctx(
        max(r.prompt_len for r in requests), max(r.output_len for r in requests))
    port = free_port()
    cmd = llamacpp_peer.server_command(binary, model, port, threads=threads(args),
                                       parallel=parallel, ctx_per_request=ctx,
                                       extra=shlex.split(args.peer_args),
                                       no_repack=llamacpp_peer.cpu_has_amx())
    server = ManagedServer("llama-server", cmd, port)
    info = {"name": "llama.cpp", "version": llamacpp_peer.binary_version(binary),
            "binary": str(binary), "model_path": str(model), "flags": cmd[1:],
            "request_extra": dict(llamacpp_peer.REQUEST_EXTRA),
            "server_start_s": server.start_s}
    return server, info


def memory(pid: int | None, engine_marker: str | None) -> dict[str, Any] | None:
    """The engine process's RSS (and every process under `pid`), or None without a pid; read
    after IDLE_S of quiet, as for any server (fornax's engine hands its free heap pages back
    to the OS once its loop has been idle for 0.5 s)."""
    if not pid:
        return None
    time.sleep(IDLE_S)
    return process_tree_memory(pid, engine_marker)


def rss_mib(mem: dict[str, Any] | None) -> float | None:
    if not mem or mem.get("engine_rss_bytes") is None:
        return None
    return float(mem["engine_rss_bytes"]) / MIB
