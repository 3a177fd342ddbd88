"""`fornax serve`: the engine core, then Granian with the API workers; SIGTERM drains (main)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from fornax.api.engine.launcher import EngineLauncher, EngineStartError
from fornax.api.engine.launcher_group import EngineGroup
from fornax.api.engine.model_manager import ModelManager
from fornax.api.routes.chat_features import check_chat_flags
from fornax.api.server.api_keys import server_keys
from fornax.api.server.args import engine_kwargs, settings_kwargs, vllm_config_notes
from fornax.api.server.logging_setup import logging_dictconfig, setup_logging
from fornax.api.server.model_entries import ModelEntry, model_entries
from fornax.api.server.model_settings import ModelSettings
from fornax.api.server.settings import ServerSettings, settings_to_env
from fornax.api.server.vllm_flags import check_vllm_flags
from fornax.runtime import env
from fornax.runtime.engine.messages import EngineHandshake
from fornax.runtime.errors import ConfigError, FornaxError
from fornax.runtime.limits import InputLimits

logger = logging.getLogger("fornax.api.server.serve")

APP_TARGET = "fornax.api.server.app:create_app"
ABORT_GRACE_S = 3.0  # after a second signal: streams end with "abort", then HTTP stops anyway


class _StartInterrupted(Exception):
    """SIGTERM/SIGINT arrived before the server was up."""


def fornax_version() -> str:
    try:
        from importlib.metadata import version

        return version("fornax")
    except Exception:  # not installed (running from a checkout)
        return "0.0.0+unknown"


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file path, or the template text itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" in value:
        return value
    raise ConfigError(f"--chat-template {value!r} is neither a file nor a jinja2 template")


def _model_names(args: argparse.Namespace) -> tuple[str, str, list[str], list[str]]:
    """(model argument, root, served names, extra aliases)."""
    model = args.model or args.model_flag or ""
    if model:
        root = model
    else:
        from fornax.runtime.loaders.default_model import default_model_path

        root = str(default_model_path())
        model = root
    served = list(args.served_model_name or [])
    if not served:
        if args.model or args.model_flag:
            served = [model]
        else:
            from fornax.runtime.loaders.default_model import DEFAULT_MODEL_NAME

            served = [DEFAULT_MODEL_NAME]
    aliases = [n for n in dict.fromkeys([model, root]) if n not in served]
    return model, root, served, aliases


def _validate(model: str, kwargs: dict[str, Any]) -> None:
    """Check the engine config here (fast, before any process starts); torch is not imported:
    the engine process resolves device "auto" (EngineConfig.resolve)."""
    from fornax.runtime.config import make_engine_config

    shown = make_engine_config(model, **kwargs).non_default_items()
    logger.info("engine config (non-default values): %s", shown or "all defaults")


def _check_on_disk(model: str, kwargs: dict[str, Any]) -> None:
    """The model and --tokenizer exist on disk (a folder, a file, a packaged name, or a hub id in
    the local Hugging Face cache); ModelLoadError naming every place looked at, before any
    process starts. The engine resolves them again the same way."""
    from fornax.runtime.loaders.model_files import resolve_model_path, resolve_tokenizer_dir
    from fornax.runtime.loaders.speech_models import packaged_name

    revision, download_dir = kwargs.get("revision"), kwargs.get("download_dir")
    if not packaged_name(model):  # packaged speech models are prepared by the engine
        resolve_model_path(model, revision, download_dir)
    resolve_tokenizer_dir(model, kwargs.get("tokenizer"), revision,
                          kwargs.get("tokenizer_revision"), download_dir)


def _tls_problem(keyfile: str | None, certfile: str | None) -> str | None:
    """TLS needs both files, readable; one alone would quietly serve plain HTTP."""
    if bool(keyfile) != bool(certfile):
        given, missing = (("--ssl-keyfile", "--ssl-certfile") if keyfile
                          else ("--ssl-certfile", "--ssl-keyfile"))
        return f"{given} needs {missing} too (with only one, the server would be plain HTTP)"
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile)):
        if path and not os.access(path, os.R_OK):
            return f"{flag} {path}: no such readable file"
    return None


def _vllm_flags_ok(args: argparse.Namespace) -> bool:
    """vLLM's flags without a fornax setting: one log line each for those accepted, an error
    line each (and exit 2) for those asking for what fornax lacks."""
    problems, notes = check_vllm_flags(args)
    try:
        notes += vllm_config_notes(args)
    except ConfigError as exc:
        problems.append(str(exc))
    for line in problems:
        logger.error("%s", line)
    for line in notes if not problems else ():
        logger.info("%s", line)
    return not problems


def _port_free(host: str, port: int) -> bool:
    """Fail before loading a model when the port is taken (Granian binds it later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _cache_info(model: str, kwargs: dict[str, Any], info: EngineHandshake) -> dict[str, str]:
    """vllm:cache_config_info's labels: the engine's KV cache as it started."""
    from fornax.api.server.metrics_catalog import cache_config_info  # no prometheus_client here
    from fornax.runtime.config import make_engine_config

    cache = make_engine_config(model, **kwargs).cache_config
    return cache_config_info(info.block_size, info.num_kv_blocks, cache.enable_prefix_caching,
                             cache.gpu_memory_utilization, info.dtype)


def run_serve(args: argparse.Namespace) -> int:
    """The whole life of `fornax serve`; returns the process exit code."""
    if args.log_level:
        env.LOG_LEVEL.set(args.log_level.upper())
    setup_logging("APIServer")
    if not _vllm_flags_ok(args):
        return 2
    problem = check_chat_flags(args) or _tls_problem(args.ssl_keyfile, args.ssl_certfile)
    if problem:
        logger.error("%s", problem)
        return 2
    if args.api_server_count < 1:
        logger.error("--api-server-count must be at least 1")
        return 2
    try:
        entries = model_entries(args, _serve_parser())  # many models; None: one, as always
        if entries is None:
            model, root, served, aliases = _model_names(args)
            entries = [ModelEntry(model, root, served, aliases, engine_kwargs(args),
                                  args.chat_template)]
        many = len(entries) > 1 or args.models is not None
        api_keys = server_keys(args.api_key)
        templates = []
        for entry in entries:
            _validate(entry.model, entry.kwargs)
            _check_on_disk(entry.model, entry.kwargs)
            templates.append(read_chat_template(entry.chat_template))
    except (FornaxError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    model, kwargs = entries[0].model, entries[0].kwargs
    server_shown = {k: v for k, v in {
        "served_model_name": entries[0].served if not many else None,
        "api_server_count": args.api_server_count,
        "api_key": f"{len(api_keys)} key(s)" if api_keys else None,
        "allowed_origins": args.allowed_origins, "uds": args.uds,
        "chat_template": args.chat_template,
        "request_timeout": args.request_timeout_s}.items() if v not in (None, [], 1)}
    logger.info("fornax %s serving %s; server settings: %s", fornax_version(),
                ", ".join(e.served[0] for e in entries) if many else model, server_shown)

    if not args.uds and not _port_free(args.host, args.port):
        logger.error("cannot listen on %s:%d: the address is in use", args.host, args.port)
        return 1
    launcher: EngineLauncher | EngineGroup = (
        EngineGroup([(e.served[0], e.model, e.kwargs) for e in entries], args.shutdown_timeout)
        if many else EngineLauncher(model, kwargs, args.shutdown_timeout))
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    manager: ModelManager | None = None

    def interrupt_start(signum: int, frame: Any) -> None:
        raise _StartInterrupted()

    for sig in previous:
        signal.signal(sig, interrupt_start)
    try:
        logger.info("starting the engine core (loading %s)", model)
        try:
            infos = (launcher.start(args.max_loaded_models, args.max_loaded_memory)
                     if isinstance(launcher, EngineGroup) else [launcher.start()])
        except EngineStartError as exc:
            logger.error("the engine core failed to start: %s", exc)
            return 1
        except _StartInterrupted:
            logger.info("interrupted while starting; exiting")
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        for entry, info in zip(entries, infos, strict=True):
            _log_ready(args, entry.served[0] if many else "", info)
        if isinstance(launcher, EngineGroup):  # loads on demand, unloads idle models
            manager = ModelManager(launcher, [e.idle_timeout for e in entries],
                                   args.max_loaded_models, launcher.loaded,
                                   args.max_loaded_memory, _idle_actions(entries, infos))
            manager.start()
        info = infos[0]
        models = [ModelSettings(
            ipc_dir=ipc_dir, engine=i, served_model_names=e.served, model_root=e.root,
            model_aliases=e.aliases, chat_template=t,
            generation_config=e.kwargs.get("generation_config", "auto"),
            cache_config_info=_cache_info(e.model, e.kwargs, i),
            reasoning_parser=e.reasoning_parser, tool_call_parser=e.tool_call_parser)
            for e, i, t, ipc_dir in zip(entries, infos, templates, _ipc_dirs(launcher),
                                        strict=True)] if many else []
        settings = ServerSettings(
            ipc_dir=launcher.ipc_dir, engine=info, served_model_names=entries[0].served,
            model_root=entries[0].root, model_aliases=entries[0].aliases, api_keys=api_keys,
            allowed_origins=args.allowed_origins or [], chat_template=templates[0],
            generation_config=kwargs.get("generation_config", "auto"),
            input_limits=InputLimits(max_n=args.max_n, max_stop_strings=args.max_stop_strings,
                                     max_prompts=args.max_prompts_per_request),
            log_requests=not args.disable_log_requests, created=int(time.time()),
            enable_dev_endpoints=args.enable_dev_endpoints or env.DEV_MODE.get(),
            version=fornax_version(), cache_config_info=_cache_info(model, kwargs, info),
            api_server_count=args.api_server_count, models=models, **settings_kwargs(args))
        return _run_granian(args, launcher, settings)
    finally:
        if manager is not None:
            manager.stop()
        launcher.abort_now()  # the HTTP server is down: no one is left to read what still runs
        code = launcher.stop(args.shutdown_timeout + 5)
        if code not in (None, 0):
            logger.warning("the engine core exited with code %s", code)
        launcher.cleanup()


def _idle_actions(entries: list[ModelEntry], infos: list[EngineHandshake]) -> list[str]:
    """Each model's idle action; `sleep` on an engine that cannot sleep (pooling, Whisper)
    stops it instead."""
    actions = []
    for entry, info in zip(entries, infos, strict=True):
        action = entry.idle_action
        if action == "sleep" and info.runner != "generate":
            logger.warning("idle_action sleep: %s (%s) cannot sleep; it is stopped when idle",
                           entry.served[0], info.runner)
            action = "stop"
        actions.append(action)
    return actions


def _serve_parser() -> argparse.ArgumentParser:
    """A `fornax serve` parser: the many-model entries' flags are read with it."""
    from fornax.api.server.args import add_serve_arguments

    parser = argparse.ArgumentParser(prog="fornax serve")
    add_serve_arguments(parser)
    return parser


def _ipc_dirs(launcher: EngineLauncher | EngineGroup) -> list[str]:
    if isinstance(launcher, EngineGroup):
        return [one.ipc_dir for one in launcher.launchers]
    return [launcher.ipc_dir]


def _log_ready(args: argparse.Namespace, name: str, info: EngineHandshake) -> None:
    """The start-up lines of one engine core (`name`: its model, on a many-model server)."""
    logger.info("engine core ready%s: %s on %s (%s), max_model_len %d, KV cache %d blocks x %d "
                "tokens = %d tokens", f" for {name}" if name else "", info.architecture,
                info.device, info.dtype, info.max_model_len, info.num_kv_blocks,
                info.block_size, info.kv_capacity_tokens)
    logger.info("admission: at most %d requests in flight (--max-num-queued-reqs%s), %s; "
                "beyond that 503 with Retry-After", info.max_num_queued_reqs,
                "" if args.max_num_queued_reqs else ": the default, from the KV capacity",
                f"{info.max_num_queued_tokens} waiting prompt tokens (--max-num-queued-tokens)"
                if info.max_num_queued_tokens else "no bound on waiting prompt tokens")


def _run_granian(args: argparse.Namespace, launcher: EngineLauncher | EngineGroup,
                 settings: ServerSettings) -> int:
    from granian import Granian
    from granian.constants import Interfaces, Loops

    metrics_dir = os.path.join(launcher.ipc_dir, "prometheus")
    os.makedirs(metrics_dir, exist_ok=True)
    env.PROMETHEUS_MULTIPROC_DIR.set(metrics_dir)  # before any worker imports prometheus_client
    settings_to_env(settings)
    extra: dict[str, Any] = {}
    if args.uds:
        extra["uds"] = Path(args.uds)
    if args.ssl_certfile and args.ssl_keyfile:
        extra.update(ssl_cert=Path(args.ssl_certfile), ssl_key=Path(args.ssl_keyfile))
    server = Granian(APP_TARGET, address=args.host, port=args.port, interface=Interfaces.ASGI,
                     workers=args.api_server_count, loop=Loops.auto, factory=True,
                     log_dictconfig=logging_dictconfig(),
                     workers_kill_timeout=int(args.shutdown_timeout) + 5, **extra)
    engine_died = threading.Event()
    grace = env.ENGINE_DEAD_GRACE_S.get()  # keep answering 503 this long, then exit

    def on_engine_death(code: int) -> None:
        engine_died.set()
        logger.error("the engine core died (exit code %s); failing requests with 503 and exiting "
                     "in %.1f s", code, grace)
        timer = threading.Timer(grace, server.signal_handler_interrupt)
        timer.daemon = True
        timer.start()

    launcher.watch(on_engine_death)
    drain_started, aborting = threading.Event(), threading.Event()

    @server.on_startup
    def drain_on_signal() -> None:  # runs after Granian installed its own handlers
        for sig in (signal.SIGINT, signal.SIGTERM):
            granian_handler = signal.getsignal(sig)

            def handler(signum: int, frame: Any, _inner: Any = granian_handler) -> None:
                if not callable(_inner):
                    return
                if aborting.is_set():  # a third signal: stop the HTTP server now
                    _inner(signum, frame)
                    return
                if drain_started.is_set():  # a second one: abort in-flight requests now
                    aborting.set()
                    logger.info("received %s again: aborting in-flight requests now",
                                signal.Signals(signum).name)
                    launcher.abort_now()  # the drain-wait thread stops HTTP once it exits
                    timer = threading.Timer(ABORT_GRACE_S, _inner, (signum, None))
                    timer.daemon = True
                    timer.start()
                    return
                drain_started.set()
                logger.info("received %s: draining (up to %.0f s); /health answers 503 "
                            "meanwhile", signal.Signals(signum).name, args.shutdown_timeout)
                launcher.request_drain()
                # keep listening while the engine drains, so that load balancers see /health
                # 503 (not a refused connection) and in-flight requests finish; then stop
                threading.Thread(target=stop_http_after_drain, args=(_inner, signum),
                                 name="drain-wait", daemon=True).start()

            signal.signal(sig, handler)

    def stop_http_after_drain(granian_handler: Any, signum: int) -> None:
        launcher.wait(args.shutdown_timeout + 5)
        granian_handler(signum, None)

    code = 0
    try:
        server.serve()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except OSError as exc:  # could not bind after all (the port was taken meanwhile)
        logger.error("the HTTP server failed: %s", exc)
        code = 1
    if engine_died.is_set():
        return 1
    if code == 1 and drain_started.is_set():
        # a signal sent to the whole process group (Ctrl-C, systemd, a Ray replica) also
        # stopped the API workers, which Granian reports as their unexpected exit: a drain
        return 0
    return code
