"""`fornax serve` flags (vLLM's names) and their translation into engine and server settings."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import msgspec

from fornax.api.server.settings import ServerSettings
from fornax.api.server.vllm_flags import FlagGroups, choice_type, json_value
from fornax.runtime.cli_types import positive_int
from fornax.runtime.config import engine_field, field_default
from fornax.runtime.errors import ConfigError
from fornax.runtime.limits import (
    MAX_IDLE_TIMEOUT_S,
    MAX_LOADED_MEMORY_BYTES,
    MAX_N,
    MAX_PROMPTS,
    MAX_STOP_STRINGS,
    MIN_LOADED_MEMORY_BYTES,
)

SHUTDOWN_TIMEOUT_S = 5.0  # --shutdown-timeout: SIGTERM's drain before in-flight requests abort
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """'4096', '4k', '4K', '2GiB' -> an integer (bytes or tokens); lower-case k/m/g are powers of
    1000, upper-case or 'i' units powers of 1024."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 4k, 2GiB)")
    number, unit, binary = match.groups()
    base = 1024 if binary or unit.isupper() else 1000  # vLLM: 4k = 4000, 4K = 4096
    return int(float(number) * base ** _POWERS[unit.lower()])


def _origins(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--allowed-origins: bad JSON list: {exc}") from exc
        return [str(v) for v in value]
    return [part.strip() for part in text.split(",") if part.strip()]


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a JSON object is expected")
    return value


def _responses_store(text: str) -> str:
    if text == "memory" or (text.startswith("sqlite:") and len(text) > len("sqlite:")):
        return text
    raise argparse.ArgumentTypeError(f"expected memory or sqlite:PATH, got {text!r}")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = 0.0 if text.strip() in ("0", "0.0") else _positive(text)
    return value


def _count(text: str) -> int:
    value = _non_negative(text)
    if not value <= 1000 or value != int(value):
        raise argparse.ArgumentTypeError(f"a whole number from 0 to 1000 expected, got {text!r}")
    return int(value)


def _idle_seconds(text: str) -> float:
    value = _non_negative(text)
    if value > MAX_IDLE_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"at most {MAX_IDLE_TIMEOUT_S} seconds, got {text!r}")
    return value


def memory_budget(text: str) -> int:
    """--max-loaded-memory: bytes or a size (6GiB, 6G, 6000M); 0: no budget."""
    value = parse_size(text)
    if value and not MIN_LOADED_MEMORY_BYTES <= value <= MAX_LOADED_MEMORY_BYTES:
        raise argparse.ArgumentTypeError(
            f"0 (no budget) or from {MIN_LOADED_MEMORY_BYTES // 2**20}MiB to "
            f"{MAX_LOADED_MEMORY_BYTES // 2**50}PiB expected, got {text!r}")
    return value


def _model_len(text: str) -> int | None:
    """--max-model-len: a size, or auto / -1 for the model's own (vLLM's spellings)."""
    return None if text.strip().lower() in ("auto", "-1") else parse_size(text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in re.split(r"[,\s]+", text.strip("[] ")) if part]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc


# vLLM's attention backend names for fornax's backends (--attention-backend FLASHINFER)
_VLLM_BACKENDS = {"FLASHINFER": "flashinfer", "CPU_ATTN": "cpu_paged", "TORCH_SDPA": "torch_ref"}


def _show(value: Any) -> str:
    """A default as `--help` shows it: on/off, whole numbers without '.0', sizes in MiB."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int) and value >= 2**20 and value % 2**20 == 0:
        return f"{value // 2**20}MiB"
    return str(value)


def _with_default(help_text: str, default: Any, shown: str | None = None) -> str:
    shown = shown or (None if default is None or default is False else _show(default))
    return f"{help_text} (default: {shown})" if shown else help_text


# Engine flags: (flag names, config field, argparse keywords). Help, choices and the default
# shown come from the field in runtime/config.py; a flag not given is None, so the config's own
# default applies (make_engine_config gets only the flags that were given).
_QUEUE_FLAGS: tuple[tuple[tuple[str, ...], str, dict[str, Any]], ...] = (
    (("--max-num-queued-reqs", "--max-num-queued-requests"), "max_num_queued_reqs",
     {"type": int}),
    (("--max-num-queued-tokens",), "max_num_queued_tokens", {"type": parse_size}),
)
_ENGINE_FLAGS: tuple[tuple[tuple[str, ...], str, dict[str, Any]], ...] = (
    (("--runner",), "runner", {}),
    (("--pooler-config",), "pooler_config", {"type": _json_object}),
    (("--dtype",), "dtype", {"type": str.lower}),
    (("--max-model-len",), "max_model_len", {"type": _model_len}),
    (("--load-format",), "load_format", {}),
    (("--quantization", "-q"), "quantization", {}),
    (("--revision",), "revision", {}),
    (("--download-dir",), "download_dir", {}),
    (("--tokenizer",), "tokenizer", {}),
    (("--tokenizer-revision",), "tokenizer_revision", {}),
    (("--seed",), "seed", {"type": int}),
    (("--generation-config",), "generation_config", {}),
    (("--device",), "device", {}),
    (("--attention-backend",), "attention_backend", {"aliases": _VLLM_BACKENDS}),
    (("--tensor-parallel-size", "-tp"), "tensor_parallel_size", {"type": int}),
    (("--max-logprobs",), "max_logprobs", {"type": int}),
    (("--gpu-memory-utilization",), "gpu_memory_utilization", {"type": float}),
    (("--kv-cache-memory", "--kv-cache-memory-bytes"), "kv_cache_memory_bytes",
     {"type": parse_size}),
    (("--num-gpu-blocks-override",), "num_gpu_blocks_override", {"type": int}),
    (("--block-size",), "block_size", {"type": int}),
    (("--enable-prefix-caching",), "enable_prefix_caching",
     {"action": argparse.BooleanOptionalAction}),
    (("--max-num-seqs",), "max_num_seqs", {"type": int}),
    (("--max-num-batched-tokens",), "max_num_batched_tokens", {"type": parse_size}),
    (("--enable-chunked-prefill",), "enable_chunked_prefill",
     {"action": argparse.BooleanOptionalAction}),
    (("--long-prefill-token-threshold",), "long_prefill_token_threshold", {"type": int}),
    (("--max-num-partial-prefills",), "max_num_partial_prefills", {"type": int}),
    (("--prefill-itl-factor",), "prefill_itl_factor", {"type": float}),
    (("--scheduling-policy",), "policy", {}),
    (("--enforce-eager",), "enforce_eager", {"action": argparse.BooleanOptionalAction}),
    (("--grammar-compile-timeout",), "grammar_compile_timeout_s", {"type": _positive}),
    (("--grammar-compile-threads",), "grammar_compile_threads", {"type": positive_int}),
    (("--grammar-max-pending-compiles",), "grammar_max_pending_compiles",
     {"type": positive_int}),
    (("--grammar-cache-memory",), "grammar_cache_bytes", {"type": parse_size}),
    (("--cudagraph-capture-sizes", "--cuda-graph-sizes"), "cuda_graph_sizes",
     {"type": _int_list, "nargs": "+", "action": "extend"}),
    (("--max-cudagraph-capture-size",), "max_capture_size", {"type": positive_int}),
)
_ENGINE_DESTS = tuple(field for _, field, _ in _QUEUE_FLAGS + _ENGINE_FLAGS)

# Flags copied into ServerSettings as they are: (flag names, settings field, argparse keywords,
# help). The default is the field's in ServerSettings (api/server/settings.py).
_SETTINGS_FLAGS: tuple[tuple[tuple[str, ...], str, dict[str, Any], str], ...] = (
    (("--trust-request-chat-template",), "trust_request_chat_template",
     {"action": "store_true"}, "let requests pass their own `chat_template` (refused by "
     "default: a template is code the server runs)"),
    (("--chat-template-content-format",), "chat_template_content_format",
     {"choices": ("auto", "string", "openai")}, "message content as a string or OpenAI's list "
     "of parts; auto: detected from the template"),
    (("--default-chat-template-kwargs",), "default_chat_template_kwargs", {"type": _json_object},
     'chat template variables for every request, e.g. \'{"enable_thinking": false}\'; a '
     "request's own chat_template_kwargs win key by key"),
    (("--request-timeout",), "request_timeout_s", {"type": _positive},
     "seconds a generation or pooling request may take in all (queue time included); beyond it "
     "the request is aborted, its KV freed, and answered 504. A request may ask for less with "
     "the X-Request-Timeout header (seconds). Default: no deadline"),
    (("--engine-stall-timeout",), "engine_stall_timeout_s", {"type": _non_negative},
     "watchdog: when the engine core's loop makes no progress for this many seconds, /health "
     "answers 503 until it moves again; 0 turns it off"),
    (("--max-request-body-bytes",), "max_request_body_bytes", {"type": parse_size},
     "larger request bodies get 413"),
    (("--max-audio-filesize-mb",), "max_audio_filesize_mb", {"type": float},
     "audio uploads to /v1/audio/* larger than this get 413"),
    (("--max-audio-seconds",), "max_audio_seconds", {"type": _positive},
     "audio longer than this (counted at the model's 16 kHz, refused from the file's header "
     "where it can be) gets 400"),
    (("--realtime-max-sessions",), "realtime_max_sessions", {"type": positive_int},
     "WS /v1/realtime: open sessions per API worker; more are closed at once with code 1013, "
     "try again later"),
    (("--realtime-max-buffer-seconds",), "realtime_max_buffer_s", {"type": _positive},
     "WS /v1/realtime: most seconds of audio a session may have waiting to be transcribed; "
     "appends beyond it get an invalid_audio error"),
    (("--realtime-max-session-seconds",), "realtime_max_session_s", {"type": _positive},
     "WS /v1/realtime: a session is closed after this many seconds"),
    (("--realtime-idle-timeout",), "realtime_idle_timeout_s", {"type": _positive},
     "WS /v1/realtime: a session is closed after this many seconds without a client event "
     "while nothing is being transcribed"),
    (("--realtime-vad",), "realtime_vad", {"choices": ("silero", "energy")},
     "WS /v1/realtime: the turn detector (server_vad): silero (Silero VAD's ONNX model through "
     "onnxruntime; the energy detector when it is not installed) or energy (a level detector "
     "against the noise floor: no model, fooled by music and loud noise)"),
    (("--disable-fastapi-docs",), "disable_fastapi_docs", {"action": "store_true"},
     "serve no /docs and no /openapi.json (vLLM's name; 404 then)"),
    (("--enable-tokenizer-info-endpoint",), "enable_tokenizer_info_endpoint",
     {"action": "store_true"}, "serve GET /tokenizer_info and /get_tokenizer_info (the "
     "tokenizer's config and chat template; off by default, as in vLLM, since it may be "
     "sensitive)"),
    (("--responses-store",), "responses_store", {"type": _responses_store},
     "where /v1/responses keeps stored responses: memory (bounded, per API worker) or "
     "sqlite:PATH (shared by the workers, survives restarts)"),
    (("--responses-store-max-count",), "responses_store_max_count", {"type": int},
     "most stored responses kept; the oldest go first"),
    (("--responses-store-max-age",), "responses_store_max_age_s", {"type": float},
     "seconds a stored response is kept"),
    (("--responses-store-max-bytes",), "responses_store_max_bytes", {"type": parse_size},
     "most bytes (JSON) of stored responses kept, per worker for memory and in all for "
     "sqlite; the oldest go first"),
    (("--responses-store-max-record-bytes",), "responses_store_max_record_bytes",
     {"type": parse_size}, "largest stored response (its input, conversation and output as "
     "JSON): store=true beyond it is refused with 400 up front, or the answer is returned "
     "unstored, a background one failed"),
    (("--responses-max-background",), "responses_max_background", {"type": int},
     "background responses running at once per API key in each API worker; more get 429 with "
     "Retry-After"),
)
_TOOL_FLAGS: tuple[tuple[tuple[str, ...], str, dict[str, Any], str], ...] = (
    (("--enable-auto-tool-choice",), "enable_auto_tool_choice", {"action": "store_true"},
     'let the model decide when to call tools (tool_choice "auto", the default when a request '
     "has tools); needs --tool-call-parser"),
    (("--tool-call-parser",), "tool_call_parser", {},
     "how the model writes tool calls: hermes, llama3_json, mistral, pythonic, qwen3_xml, or a "
     'name a plugin registers (tool_choice "required" and named choices work without it: a '
     "grammar forces the call)"),
    (("--tool-parser-plugin",), "tool_parser_plugin", {"metavar": "FILE"},
     "a Python file that registers more tool parsers "
     "(fornax.api.tools.registry.register_tool_parser)"),
    (("--reasoning-parser",), "reasoning_parser", {},
     "split the thinking into `reasoning`: deepseek_r1 or qwen3; output constraints then start "
     "after </think>"),
)


def _metavar(names: tuple[str, ...], kw: dict[str, Any]) -> dict[str, Any]:
    """`kw` with the value's name in --help from the flag, not the dest (not for switches)."""
    if kw.get("action", "extend") != "extend" or "choices" in kw or "metavar" in kw:
        return kw
    return {"metavar": names[0].lstrip("-").upper().replace("-", "_"), **kw}


def _add_engine_flags(group: Any, table: tuple[tuple[tuple[str, ...], str, dict[str, Any]], ...]
                      ) -> None:
    for names, field, kw in table:
        f = engine_field(field)
        if f.metadata["choices"] and "action" not in kw:  # any case; vLLM's names as aliases
            aliases = kw.get("aliases")
            kw = {"choices": f.metadata["choices"], **{k: v for k, v in kw.items()
                                                       if k != "aliases"},
                  "type": choice_type(f.metadata["choices"], aliases)}
        group.add_argument(*names, dest=field, default=None,
                           help=_with_default(f.metadata["help"], field_default(f),
                                              f.metadata["shown"]), **_metavar(names, kw))


def _add_settings_flags(group: Any, table: tuple[tuple[tuple[str, ...], str, dict[str, Any], str],
                                                 ...]) -> None:
    defaults = {f.name: f.default for f in msgspec.structs.fields(ServerSettings)}
    for names, field, kw, help_text in table:
        if "choices" in kw:  # enum values in any case, as vLLM takes them
            kw = {"type": choice_type(kw["choices"]), **kw}
        group.add_argument(*names, dest=field, default=defaults[field],
                           help=_with_default(help_text, defaults[field]), **_metavar(names, kw))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Every `fornax serve` flag, in vLLM's groups (vllm_flags.FlagGroups: a flag joins its vLLM
    counterpart's group, fornax-only flags the fornax groups), then every other `vllm serve` flag
    (no-op or refused, checked at start by vllm_flags.check_vllm_flags)."""
    p.usage = "%(prog)s [MODEL] [--config FILE.yaml] [flags: vLLM's names, listed below]"
    groups = FlagGroups(p)
    p.add_argument("model", nargs="?", default=None,
                   help="HF model folder, .gguf file, or hub id (org/name) in the local Hugging "
                   "Face cache (never downloaded); omitted: the packaged default chat model "
                   "(SmolLM2-135M-Instruct)")
    groups.add_argument("--model", dest="model_flag", default=None,
                        help="same as the positional MODEL")
    groups.add_argument("--models", nargs="+", default=None, metavar="MODEL|JSON",
                        help="serve several models from one port, each in its own engine core: "
                        "a model each, or a JSON object of its flags ({\"model\": ..., "
                        "\"max_model_len\": ...}); requests pick one by `model` (`models:` in "
                        "--config: a list of such mappings). No MODEL and no --models: the "
                        "packaged chat, embedding and Whisper models")
    groups.add_argument("--max-loaded-models", type=_count, default=0, metavar="N",
                        help="with --models: at most N models loaded at once; a request for "
                        "another loads it on demand, unloading the least recently used idle one "
                        "(default: 0, all loaded)")
    groups.add_argument("--max-loaded-memory", type=memory_budget, default=0, metavar="BYTES",
                        help="with --models: a memory budget for the loaded models' engines "
                        "(bytes, or 6GiB, 6G, 6000M): each model's engine RSS is measured; a "
                        "load first stops the least recently used idle models until it fits, "
                        "and a model larger than the budget alone is refused (503) (default: 0, "
                        "no budget)")
    groups.add_argument("--idle-timeout", type=_idle_seconds, default=None, metavar="SECONDS",
                        help="with --models (also per model): unload a model after this many "
                        "seconds without requests; the next request loads it again (default: 0, "
                        "never)")
    groups.add_argument("--idle-action", choices=("stop", "sleep"), default=None,
                        help="with --models (also per model): what --idle-timeout does to an idle "
                        "model: stop its engine, or put it to sleep (KV cache released, process "
                        "and weights kept, woken by its next request; text-generation models "
                        "only, the others stop) (default: stop)")
    groups.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="flags from a YAML file (keys: flag names, with dashes or "
                        "underscores; `model:` too); the command line wins (api/server/argv.py)")

    g = groups.adder("server")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    g.add_argument("--uds", default=None, help="serve on this Unix domain socket instead of TCP")
    g.add_argument("--api-server-count", "--api-servers", type=int, default=1,
                   help="number of API worker processes, all on one engine core (default: 1)")
    g.add_argument("--served-model-name", nargs="+", action="extend", default=None,
                   help="name(s) the model answers to; the first is used in responses and "
                   "metrics (default: the MODEL argument)")
    g.add_argument("--api-key", nargs="+", action="extend", default=None,
                   help="require `Authorization: Bearer <key>` on every route except /health, "
                   "/ping and /version; several keys allowed (also FORNAX_API_KEY/VLLM_API_KEY)")
    g.add_argument("--allowed-origins", type=_origins, action="extend", default=None,
                   help="CORS origins allowed to call the API (JSON list or comma list; '*' for "
                   "any). Default: none (CORS closed)")
    g.add_argument("--chat-template", default=None,
                   help="chat template file, or the template itself (jinja2), overriding the "
                   "model's")
    _add_engine_flags(g, _QUEUE_FLAGS)
    _add_settings_flags(g, _SETTINGS_FLAGS)
    g.add_argument("--disable-log-requests", action="store_true",
                   help="do not log one line per request")
    g.add_argument("--enable-log-requests", action="store_true", help="log one line per request "
                   "(the default)")
    g.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S,
                   help="on SIGTERM, seconds to let in-flight requests finish before aborting "
                   "them (their streams end with finish_reason \"abort\"); a second signal "
                   f"aborts them at once (default: {SHUTDOWN_TIMEOUT_S:g})")
    g.add_argument("--max-stop-strings", type=positive_int, default=MAX_STOP_STRINGS,
                   help=f"most stop strings one request may give (default: {MAX_STOP_STRINGS})")
    g.add_argument("--max-n", type=positive_int, default=MAX_N,
                   help=f"cap of n, best_of and the beam width of one request (default: {MAX_N})")
    g.add_argument("--max-prompts-per-request", type=positive_int, default=MAX_PROMPTS,
                   help="most prompts in one /v1/completions request (default: "
                   f"{MAX_PROMPTS})")
    g.add_argument("--enable-dev-endpoints", action="store_true",
                   help="serve the admin routes POST /sleep?level=1|2, POST /wake_up, GET "
                   "/is_sleeping and POST /reset_prefix_cache (404 without it; also "
                   "VLLM_SERVER_DEV_MODE=1)")
    g.add_argument("--enable-sleep-mode", action="store_true",
                   help="accepted for vLLM compatibility: sleep mode is always available "
                   "through the dev endpoints")
    g.add_argument("--enable-offline-docs", action="store_true",
                   help="accepted for vLLM compatibility: /docs is always offline here (its page "
                   "and script are served by fornax, nothing comes from a CDN)")
    g.add_argument("--ssl-keyfile", default=None, help="TLS key file")
    g.add_argument("--ssl-certfile", default=None, help="TLS certificate file")
    levels = ("debug", "info", "warning", "error", "critical")
    g.add_argument("--log-level", choices=levels, type=choice_type(levels), default=None,
                   help="log level of every fornax process (default: info, or FORNAX_LOG_LEVEL)")

    _add_engine_flags(groups.adder("engine"), _ENGINE_FLAGS)
    _add_vllm_config_flags(groups.adder("engine"))
    _add_settings_flags(groups.adder("tool calling and reasoning"), _TOOL_FLAGS)
    groups.add_vllm_flags()


def _add_vllm_config_flags(g: Any) -> None:
    """vLLM's -O and JSON config flags, mapped onto engine flags by _from_vllm_configs."""
    g.add_argument("--optimization-level", type=choice_type(("0", "1", "2", "3")), default=None,
                   metavar="{0,1,2,3}", help="vLLM's -O<n>: 0 is --enforce-eager; 1, 2 and 3 "
                   "leave fornax's default (compiled with CUDA graphs on GPU, eager on CPU)")
    g.add_argument("--compilation-config", "-cc", type=json_value, default=None, metavar="JSON",
                   help='vLLM\'s compilation settings (JSON, or -cc.KEY=VALUE): "mode": 0 is '
                   "--enforce-eager, \"cudagraph_mode\": \"NONE\" turns CUDA graphs off, "
                   "cudagraph_capture_sizes and max_cudagraph_capture_size set those flags; other "
                   "keys are logged at start as having no effect")
    g.add_argument("--attention-config", "-ac", type=json_value, default=None, metavar="JSON",
                   help='vLLM\'s attention settings (JSON, or -ac.KEY=VALUE): "backend" is '
                   "--attention-backend; other keys are logged at start as having no effect")


def _config_object(args: argparse.Namespace, dest: str, flag: str) -> dict[str, Any]:
    value = getattr(args, dest, None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {value!r}")
    return value


def _from_vllm_configs(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """(engine kwargs, log lines) from -O, -cc and -ac: the keys fornax has a setting for, and a
    line for each key that has no effect here. ConfigError for a bad value, naming the flag."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    level = getattr(args, "optimization_level", None)
    compilation = _config_object(args, "compilation_config", "--compilation-config")
    attention = _config_object(args, "attention_config", "--attention-config")
    if level == "0" or str(compilation.get("mode", "")).lower() in ("0", "none"):
        out["enforce_eager"] = True
    for key, value in compilation.items():
        if key == "cudagraph_capture_sizes":
            out["cuda_graph_sizes"] = value if isinstance(value, list) else [value]
        elif key == "max_cudagraph_capture_size":
            out["max_capture_size"] = value
        elif key == "cudagraph_mode" and str(value).upper() == "NONE":
            out["use_cuda_graphs"] = False
        elif key != "mode":
            notes.append(f"--compilation-config {key}={json.dumps(value)}: accepted, no effect "
                         "in fornax (its compilation is its own: graphs/)")
    for key, value in attention.items():
        if key == "backend":
            try:
                out["attention_backend"] = choice_type(
                    engine_field("attention_backend").metadata["choices"], _VLLM_BACKENDS)(value)
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"--attention-config backend: {exc}") from None
        else:
            notes.append(f"--attention-config {key}={json.dumps(value)}: accepted, no effect "
                         "in fornax (its attention backends are its own)")
    return out, notes


def vllm_config_notes(args: argparse.Namespace) -> list[str]:
    """The start-up lines for -cc / -ac keys without effect (ConfigError for a bad value)."""
    return _from_vllm_configs(args)[1]


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Flat make_engine_config() keyword arguments for the engine flags that were given; -O,
    -cc and -ac fill in what the explicit flags leave unset."""
    given = {name: value for name in _ENGINE_DESTS
             if (value := getattr(args, name)) is not None}
    if "cuda_graph_sizes" in given:  # --cudagraph-capture-sizes 1 2 4, or 1,2,4, or [1, 2, 4]
        given["cuda_graph_sizes"] = [n for part in given["cuda_graph_sizes"]
                                     for n in (part if isinstance(part, list) else [part])]
    return {**_from_vllm_configs(args)[0], **given}


def settings_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """ServerSettings fields taken from their flags as they are (the rest serve.py builds)."""
    return {field: getattr(args, field) for _, field, _, _ in _SETTINGS_FLAGS + _TOOL_FLAGS}
