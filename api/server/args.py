"""`fornax serve` flags (vLLM's names) and their translation into engine and server settings."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from fornax.api.server.settings import DEFAULT_MAX_BODY_BYTES
from fornax.runtime.limits import MAX_N, MAX_PROMPTS, MAX_STOP_STRINGS

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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


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


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in re.split(r"[,\s]+", text.strip("[] ")) if part]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc


# Flags of features fornax does not have yet: accepted (scripts keep working when unused) but a
# clear error at start when used, never silently ignored. dest -> what it is.
NOT_SUPPORTED_YET = {
    "tokenizer": "a separate tokenizer (--tokenizer)",
    "quantization": "on-the-fly quantization (--quantization)",
    "speculative_config": "speculative decoding (--speculative-config)",
    "enable_lora": "LoRA adapters (--enable-lora)",
    "lora_modules": "LoRA adapters (--lora-modules)",
}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Every `fornax serve` flag, grouped as in `fornax serve --help`."""
    p.add_argument("model", nargs="?", default=None,
                   help="HF model folder or .gguf file; omitted: the packaged default chat model "
                   "(SmolLM2-135M-Instruct)")
    p.add_argument("--model", dest="model_flag", default=None, help="same as the positional MODEL")

    g = p.add_argument_group("server")
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
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests pass their own `chat_template` (refused by default: a "
                   "template is code the server runs)")
    g.add_argument("--chat-template-content-format", choices=("auto", "string", "openai"),
                   default="auto", help="message content as a string or OpenAI's list of parts "
                   "(default: auto-detected from the template)")
    g.add_argument("--max-num-queued-reqs", "--max-num-queued-requests", type=int, default=None,
                   dest="max_num_queued_reqs",
                   help="most requests in flight (waiting + running, engine-wide); beyond it "
                   "new ones get 503 with Retry-After at once (default: sized from the KV "
                   "cache, 4x its capacity at 1024 tokens a request, at least 2x --max-num-seqs;"
                   " logged at start)")
    g.add_argument("--max-num-queued-tokens", type=parse_size, default=None,
                   help="most prompt tokens of waiting requests; a request that would go beyond "
                   "it gets 503 with Retry-After (k/M suffixes allowed; default: no token bound)")
    g.add_argument("--request-timeout", type=_positive, default=None,
                   help="seconds a generation or pooling request may take in all (queue time "
                   "included); beyond it the request is aborted, its KV freed, and answered "
                   "504. A request may ask for less with the X-Request-Timeout header "
                   "(seconds). Default: no deadline")
    g.add_argument("--engine-stall-timeout", type=_non_negative, default=60.0,
                   help="watchdog: when the engine core's loop makes no progress for this many "
                   "seconds, /health answers 503 until it moves again (0 turns it off; "
                   "default: 60)")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="do not log one line per request")
    g.add_argument("--enable-log-requests", action="store_true", help="log one line per request "
                   "(the default)")
    g.add_argument("--shutdown-timeout", type=float, default=20.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before aborting "
                   "them (default: 20)")
    g.add_argument("--max-request-body-bytes", type=parse_size, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies get 413 (default: 32MiB)")
    g.add_argument("--max-stop-strings", type=_positive_int, default=MAX_STOP_STRINGS,
                   help=f"most stop strings one request may give (default: {MAX_STOP_STRINGS})")
    g.add_argument("--max-n", type=_positive_int, default=MAX_N,
                   help=f"cap of n, best_of and the beam width of one request (default: {MAX_N})")
    g.add_argument("--max-prompts-per-request", type=_positive_int, default=MAX_PROMPTS,
                   help="most prompts in one /v1/completions request (default: "
                   f"{MAX_PROMPTS})")
    g.add_argument("--max-audio-filesize-mb", type=float, default=25.0,
                   help="audio uploads to /v1/audio/* larger than this get 413 (default: 25)")
    g.add_argument("--max-audio-seconds", type=_positive, default=7200.0,
                   help="audio longer than this (counted at the model's 16 kHz, refused from the "
                   "file's header where it can be) gets 400 (default: 7200)")
    g.add_argument("--realtime-max-sessions", type=_positive_int, default=100,
                   help="WS /v1/realtime: open sessions per API worker; more are closed at once "
                   "with code 1013, try again later (default: 100)")
    g.add_argument("--realtime-max-buffer-seconds", type=_positive, default=300.0,
                   help="WS /v1/realtime: most seconds of audio a session may have waiting to be "
                   "transcribed; appends beyond it get an invalid_audio error (default: 300)")
    g.add_argument("--realtime-max-session-seconds", type=_positive, default=3600.0,
                   help="WS /v1/realtime: a session is closed after this many seconds "
                   "(default: 3600)")
    g.add_argument("--realtime-idle-timeout", type=_positive, default=60.0,
                   help="WS /v1/realtime: a session is closed after this many seconds without "
                   "a client event while nothing is being transcribed (default: 60)")
    g.add_argument("--enable-dev-endpoints", action="store_true",
                   help="serve the admin routes POST /sleep?level=1|2, POST /wake_up, GET "
                   "/is_sleeping and POST /reset_prefix_cache (404 without it; also "
                   "VLLM_SERVER_DEV_MODE=1)")
    g.add_argument("--enable-sleep-mode", action="store_true",
                   help="accepted for vLLM compatibility: sleep mode is always available "
                   "through the dev endpoints")
    g.add_argument("--responses-store", type=_responses_store, default="memory",
                   help="where /v1/responses keeps stored responses: memory (default; bounded, "
                   "per API worker) or sqlite:PATH (shared by the workers, survives restarts)")
    g.add_argument("--responses-store-max-count", type=int, default=10000,
                   help="most stored responses kept; the oldest go first (default: 10000)")
    g.add_argument("--responses-store-max-age", type=float, default=24 * 3600.0,
                   help="seconds a stored response is kept (default: 86400)")
    g.add_argument("--responses-store-max-bytes", type=parse_size, default=512 * 1024 * 1024,
                   help="most bytes (JSON) of stored responses kept, per worker for memory and "
                   "in all for sqlite; the oldest go first (default: 512MiB)")
    g.add_argument("--responses-store-max-record-bytes", type=parse_size,
                   default=16 * 1024 * 1024,
                   help="largest stored response (its input, conversation and output as JSON): "
                   "store=true beyond it is refused with 400 up front, or the answer is returned "
                   "unstored, a background one failed (default: 16MiB)")
    g.add_argument("--responses-max-background", type=int, default=64,
                   help="background responses running at once per API key in each API worker; "
                   "more get 429 with Retry-After (default: 64)")
    g.add_argument("--ssl-keyfile", default=None, help="TLS key file")
    g.add_argument("--ssl-certfile", default=None, help="TLS certificate file")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                   help="log level of every fornax process (default: info, or FORNAX_LOG_LEVEL)")

    m = p.add_argument_group("model and engine")
    m.add_argument("--runner", choices=("auto", "generate", "pooling"), default=None,
                   help="generate text, or pool (embeddings, classification, score/rerank); "
                   "auto (default) decides by the model's architecture")
    m.add_argument("--pooler-config", type=_json_object, default=None,
                   help='pooling models: override the pooling, e.g. \'{"pooling_type": "MEAN", '
                   '"normalize": false}\' (default: from the sentence-transformers files)')
    m.add_argument("--dtype", default=None,
                   help="auto, float32, float16, bfloat16 (aliases: float, half, bf16)")
    m.add_argument("--max-model-len", type=parse_size, default=None,
                   help="context length (default: the model's); accepts 4k, 8K, ...")
    m.add_argument("--load-format", choices=("auto", "safetensors", "gguf", "dummy"), default=None)
    m.add_argument("--seed", type=int, default=None, help="engine random seed")
    m.add_argument("--generation-config", default=None,
                   help="auto: sampling defaults from the model's generation_config.json; "
                   "fornax: fornax's own defaults")
    m.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    m.add_argument("--attention-backend", choices=("auto", "torch_ref", "cpu_paged", "flashinfer"),
                   default=None)
    m.add_argument("--tensor-parallel-size", "-tp", type=int, default=None)
    m.add_argument("--max-logprobs", type=int, default=None,
                   help="most logprobs a request may ask for (default: 20)")
    m.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory for weights and KV cache (default: 0.9)")
    m.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", dest="kv_cache_memory",
                   type=parse_size, default=None, help="KV-cache size in bytes (e.g. 2GiB)")
    m.add_argument("--num-gpu-blocks-override", type=int, default=None)
    m.add_argument("--block-size", type=int, default=None, help="tokens per KV block (16)")
    m.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None, help="reuse KV blocks of shared prompt prefixes (default: on)")
    m.add_argument("--max-num-seqs", type=int, default=None,
                   help="most requests in one batch (default: 256)")
    m.add_argument("--max-num-batched-tokens", type=parse_size, default=None,
                   help="token budget of one step (default: 8192)")
    m.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=None, help="split long prompts over steps (default: on)")
    m.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default=None)
    m.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="no torch.compile, no CUDA graphs")
    m.add_argument("--grammar-compile-timeout", dest="grammar_compile_timeout_s", type=_positive,
                   default=None, help="seconds one structured-output grammar may take to "
                   "compile; beyond it the request gets 400 'grammar too complex' (default: 10)")
    m.add_argument("--grammar-compile-threads", type=_positive_int, default=None,
                   help="threads compiling grammars; also the most runaway compiles at once "
                   "(default: 2)")
    m.add_argument("--grammar-max-pending-compiles", type=_positive_int, default=None,
                   help="grammar compiles queued or running; beyond it 503 with Retry-After "
                   "(default: 64)")
    m.add_argument("--grammar-cache-memory", dest="grammar_cache_bytes", type=parse_size,
                   default=None, help="memory of compiled grammars kept for reuse, LRU "
                   "(default: 512MiB)")
    m.add_argument("--cuda-graph-sizes", type=_int_list, action="extend", default=None,
                   help="batch sizes to capture CUDA graphs for (e.g. 1 2 4 8 16)")

    t = p.add_argument_group("tool calling and reasoning")
    t.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                   help='let the model decide when to call tools (tool_choice "auto", the default '
                   "when a request has tools); needs --tool-call-parser")
    t.add_argument("--tool-call-parser", default=None,
                   help="how the model writes tool calls: hermes, llama3_json, mistral, pythonic, "
                   'qwen3_xml, or a name a plugin registers (tool_choice "required" and named '
                   "choices work without it: a grammar forces the call)")
    t.add_argument("--tool-parser-plugin", default=None, metavar="FILE",
                   help="a Python file that registers more tool parsers "
                   "(fornax.api.tools.registry.register_tool_parser)")
    t.add_argument("--reasoning-parser", default=None,
                   help="split the thinking into `reasoning`: deepseek_r1 or qwen3; output "
                   "constraints then start after </think>")

    n = p.add_argument_group("not supported yet (accepted; an error at start when used)")
    n.add_argument("--tokenizer", default=None)
    n.add_argument("--quantization", "-q", default=None)
    n.add_argument("--speculative-config", default=None)
    n.add_argument("--enable-lora", action="store_true", default=None)
    n.add_argument("--lora-modules", nargs="+", default=None)
    n.add_argument("--trust-remote-code", action="store_true",
                   help="accepted and ignored: fornax never runs code shipped with a model")


_ENGINE_FLAGS = ("runner", "pooler_config", "dtype", "max_model_len", "load_format", "seed",
                 "generation_config", "device",
                 "attention_backend", "tensor_parallel_size", "max_logprobs",
                 "gpu_memory_utilization", "kv_cache_memory", "num_gpu_blocks_override",
                 "block_size", "enable_prefix_caching", "max_num_seqs", "max_num_batched_tokens",
                 "enable_chunked_prefill", "enforce_eager", "cuda_graph_sizes",
                 "max_num_queued_reqs", "max_num_queued_tokens", "grammar_compile_timeout_s",
                 "grammar_compile_threads", "grammar_max_pending_compiles",
                 "grammar_cache_bytes")


def unsupported_flags_used(args: argparse.Namespace) -> list[str]:
    return [what for dest, what in NOT_SUPPORTED_YET.items()
            if getattr(args, dest, None) not in (None, False)]


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Flat make_engine_config() keyword arguments for the flags that were given."""
    kwargs: dict[str, Any] = {}
    for name in _ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    if args.scheduling_policy is not None:
        kwargs["policy"] = args.scheduling_policy
    if args.served_model_name:
        kwargs["served_model_name"] = list(args.served_model_name)
    return kwargs
