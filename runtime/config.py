"""Frozen engine configuration, validated on construction (any process)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from fornax.runtime.errors import ConfigError

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_QUANTIZATIONS = ("gguf",)
_POLICIES = ("fcfs", "priority")
_RUNNERS = ("auto", "generate", "pooling")
_DEVICES = ("auto", "cuda", "cpu")
_ATTENTION_BACKENDS = ("auto", "torch_ref", "cpu_paged", "flashinfer")
_REF_RE = re.compile(r"^[\w.+-]+(?:/[\w.+-]+)*$")  # a git branch, tag or commit hash
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "fp32": "float32", "fp16": "float16",
                  "bf16": "bfloat16"}

# The default admission bound: enough in-flight requests to fill the KV cache QUEUE_KV_MULTIPLE
# times over at QUEUE_TYPICAL_TOKENS tokens a request (prompt + output), and never fewer than
# QUEUE_MIN_BATCHES full batches (--max-num-seqs), so a small cache still keeps the batch full.
QUEUE_KV_MULTIPLE = 4
QUEUE_TYPICAL_TOKENS = 1024
QUEUE_MIN_BATCHES = 2
MAX_PREFILL_ITL_FACTOR = 100.0  # --prefill-itl-factor above this is a typo (use 0 for off)


def _opt(default: Any, help: str, *, choices: tuple[str, ...] = (), shown: str | None = None,
         factory: Any = None) -> Any:
    """A field with its documentation: `help`, the allowed `choices` and how the default is
    `shown` when its value says little. `fornax serve --help` is built from these
    (api/server/args.py), so a default and its description live here only."""
    metadata = {"help": help, "choices": choices, "shown": shown}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how: path, format, dtype, context length, seed."""

    model: str
    dtype: str = _opt("auto", "auto, float32, float16, bfloat16 (aliases: float, half, bf16)")
    max_model_len: int | None = _opt(None, "context length; accepts 4k, 8K, ...",
                                     shown="the model's")
    load_format: str = _opt("auto", "weights from safetensors, a GGUF file, or random (dummy)",
                            choices=_LOAD_FORMATS)
    quantization: str | None = _opt(
        None, "gguf: a GGUF model's Q8_0, Q4_0, Q4_1, Q4_K and Q6_K weights stay quantized in "
        "memory, whatever the dtype (implied for a bfloat16 .gguf model; float32 dequantizes at "
        "load without it; FORNAX_GGUF_DEQUANTIZE=1: always)", choices=_QUANTIZATIONS,
        shown="gguf for a bfloat16 .gguf model")
    seed: int = _opt(0, "engine random seed")
    generation_config: str = _opt(
        "auto", "auto: sampling defaults from the model's generation_config.json; fornax: "
        "fornax's own defaults")
    runner: str = _opt("auto", "generate text, or pool (embeddings, classification, "
                       "score/rerank); auto decides by the model's architecture",
                       choices=_RUNNERS)
    pooler_config: dict[str, Any] = _opt(
        None, 'pooling models: override the pooling, e.g. \'{"pooling_type": "MEAN", '
        '"normalize": false}\'', factory=dict, shown="from the sentence-transformers files")
    revision: str | None = _opt(
        None, "a hub id's branch, tag (refs/<name> in the local Hugging Face cache) or commit "
        "hash", shown="main")
    download_dir: str | None = _opt(
        None, "a Hugging Face cache folder searched first for hub ids (fornax never downloads; "
        "then HF_HUB_CACHE, TRANSFORMERS_CACHE, $HF_HOME/hub)")
    tokenizer: str | None = _opt(
        None, "another tokenizer: a folder or a hub id in the local cache (tokenizer.json and "
        "its chat template)", shown="the model's")
    tokenizer_revision: str | None = _opt(
        None, "--tokenizer's branch, tag or commit hash",
        shown="--revision for the model's own tokenizer, else main")

    def __post_init__(self) -> None:
        if self.runner not in _RUNNERS:
            raise ConfigError(f"runner must be 'auto', 'generate' or 'pooling', got {self.runner!r}")
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        object.__setattr__(self, "dtype", dtype)
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.load_format not in _LOAD_FORMATS:
            raise ConfigError(
                f"load_format must be one of {', '.join(_LOAD_FORMATS)}, got {self.load_format!r}"
            )
        if self.quantization is not None and self.quantization not in _QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(_QUANTIZATIONS)} (GGUF "
                              f"weights kept quantized), got {self.quantization!r}")
        _positive("max_model_len", self.max_model_len)
        if self.generation_config not in ("auto", "fornax", "vllm"):
            raise ConfigError("generation_config must be 'auto' or 'fornax'")
        for name in ("revision", "tokenizer_revision"):
            value = getattr(self, name)
            if value is not None and (not _REF_RE.match(value) or ".." in value.split("/")):
                raise ConfigError(f"{name} {value!r} is not a branch, tag or commit hash")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size, capacity, prefix caching."""

    block_size: int = _opt(16, "tokens per KV block")
    enable_prefix_caching: bool = _opt(True, "reuse KV blocks of shared prompt prefixes")
    kv_cache_memory_bytes: int | None = _opt(None, "KV-cache size in bytes (e.g. 2GiB)")
    num_gpu_blocks_override: int | None = _opt(
        None, "this many KV blocks, whatever the memory (for tests)")
    gpu_memory_utilization: float = _opt(
        0.9, "fraction of GPU memory for weights and KV cache")

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.block_size > 1024:
            raise ConfigError(f"block_size must be at most 1024, got {self.block_size}")
        _positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        _positive("num_gpu_blocks_override", self.num_gpu_blocks_override)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """One token budget per step; batch limits; ordering policy."""

    max_num_seqs: int = _opt(256, "most requests in one batch")
    max_num_batched_tokens: int = _opt(8192, "token budget of one step")
    enable_chunked_prefill: bool = _opt(True, "split long prompts over steps")
    long_prefill_token_threshold: int = _opt(
        0, "most prompt tokens one request prefills in a step (0: no such cap)")
    max_num_partial_prefills: int = _opt(
        1, "most requests whose prompt is prefilled over several steps at once (a prompt that "
        "fits the rest of a step's budget may always join)")
    # 0 by default: measured on the quiet 2-core Xeon (perf/results/prefill_budget/), capping
    # prompt chunks cost 25-38% of the output throughput and 2.7-3x the TTFT for the same ITL
    # p50/p95 (only p99 improved), since a prompt prefilled over many steps keeps its request
    # from decoding (vLLM's default is also the token budget alone)
    prefill_itl_factor: float = _opt(
        0.0, "while requests decode, cap a step's prompt tokens so the step takes about this "
        "many times a pure-decode step (both timed online; at least 8 prompt tokens a step on "
        "the fused CPU call, else 32), trading throughput and TTFT for a shorter ITL tail while "
        "long prompts arrive; 0: only the token budget")
    policy: str = _opt("fcfs", "the order waiting requests are scheduled in: first come first "
                       "served, or by each request's `priority`", choices=_POLICIES)
    # admission (vLLM's names): in-flight requests (waiting + running) and prompt tokens waiting;
    # None = the default, sized from the KV cache at start (see queue_limits)
    max_num_queued_reqs: int | None = _opt(
        None, "most requests in flight (waiting + running, engine-wide); beyond it new ones get "
        "503 with Retry-After at once", shown=f"sized from the KV cache, {QUEUE_KV_MULTIPLE}x its "
        f"capacity at {QUEUE_TYPICAL_TOKENS} tokens a request, at least {QUEUE_MIN_BATCHES}x "
        "--max-num-seqs; logged at start")
    max_num_queued_tokens: int | None = _opt(
        None, "most prompt tokens of waiting requests; a request that would go beyond it gets "
        "503 with Retry-After; k/M suffixes allowed", shown="no token bound")

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_num_queued_reqs", self.max_num_queued_reqs)
        _positive("max_num_queued_tokens", self.max_num_queued_tokens)
        _positive("max_num_partial_prefills", self.max_num_partial_prefills)
        threshold = self.long_prefill_token_threshold
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise ConfigError("long_prefill_token_threshold must be a non-negative integer, got "
                              f"{threshold!r}")
        factor = self.prefill_itl_factor
        if (isinstance(factor, bool) or not isinstance(factor, (int, float))
                or not (factor == 0 or 1.0 <= factor <= MAX_PREFILL_ITL_FACTOR)):
            raise ConfigError(f"prefill_itl_factor must be 0 (off) or between 1 and "
                              f"{MAX_PREFILL_ITL_FACTOR:g}, got {factor!r}")
        if self.policy not in _POLICIES:
            raise ConfigError(f"scheduling policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass(frozen=True)
class CompilationConfig:
    """torch.compile and CUDA-graph settings (used by graphs/)."""

    enforce_eager: bool | None = _opt(None, "no torch.compile, no CUDA graphs",
                                      shown="eager on CPU, compiled + CUDA graphs on GPU")
    cuda_graph_sizes: tuple[int, ...] = _opt(
        (), "batch sizes to capture CUDA graphs for (e.g. 1 2 4 8 16)",
        shown="1, 2, 4, 8 and every multiple of 16 up to the largest batch")
    use_cuda_graphs: bool = _opt(True, "False: compiled but no CUDA graphs (benchmarks compare "
                                 "both)")
    max_capture_size: int = _opt(256, "the largest batch captured in a CUDA graph")

    def __post_init__(self) -> None:
        for size in self.cuda_graph_sizes:
            _positive("cuda_graph_sizes entry", size)
        _positive("max_capture_size", self.max_capture_size)


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """Bounds on grammar compilation (runtime/structured_output/grammar_pool.py, grammar_cache.py).

    xgrammar's compile cannot be interrupted: a compile past its time limit is answered at once
    ("grammar too complex", 400) while its thread runs on, so at most `grammar_compile_threads`
    compiles ever run. A compile also waits at most the time limit for a free thread (then 503).
    """

    grammar_compile_timeout_s: float = _opt(
        10.0, "seconds one structured-output grammar may take to compile; beyond it the "
        "request gets 400 'grammar too complex'")
    grammar_compile_threads: int = _opt(
        2, "threads compiling grammars; also the most runaway compiles at once")
    grammar_max_pending_compiles: int = _opt(
        64, "grammar compiles queued or running; beyond it 503 with Retry-After")
    grammar_cache_bytes: int = _opt(512 * 2**20, "memory of compiled grammars kept for reuse, LRU")
    grammar_max_failures: int = _opt(1024, "refused grammars remembered (refused again at once)")
    grammar_max_waiting_requests: int = _opt(
        4096, "requests held for their grammar's compile; beyond it 503")

    def __post_init__(self) -> None:
        timeout = self.grammar_compile_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                not 0 < timeout <= 3600:
            raise ConfigError(f"grammar_compile_timeout_s must be in (0, 3600], got {timeout!r}")
        for name in ("grammar_compile_threads", "grammar_max_pending_compiles",
                     "grammar_cache_bytes", "grammar_max_failures",
                     "grammar_max_waiting_requests"):
            _positive(name, getattr(self, name))
        if self.grammar_compile_threads > 64:
            raise ConfigError("grammar_compile_threads must be at most 64, got "
                              f"{self.grammar_compile_threads}")

    @property
    def grammar_queue_wait_s(self) -> float:
        """How long a compile may wait for a free thread before the request gets 503."""
        return self.grammar_compile_timeout_s


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine core needs, made once from the CLI or `LLM(...)` arguments.

    `device="auto"` stays unresolved here (no torch import); `resolve()` picks the device, once,
    where an engine is about to be built.
    """

    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    compilation_config: CompilationConfig = field(default_factory=CompilationConfig)
    structured_outputs_config: StructuredOutputsConfig = field(
        default_factory=StructuredOutputsConfig)
    device: str = _opt("auto", "where the model runs", choices=_DEVICES,
                       shown="auto: cuda when available, else cpu")
    attention_backend: str = _opt(
        "auto", "attention kernels; auto: flashinfer on CUDA when installed, cpu_paged on CPU "
        "when its C kernel builds, else torch_ref", choices=_ATTENTION_BACKENDS)
    max_logprobs: int = _opt(20, "most logprobs a request may ask for")
    tensor_parallel_size: int = _opt(1, "GPUs to split the model over (only 1 is supported yet)")

    def __post_init__(self) -> None:
        if self.device not in _DEVICES:
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise ConfigError(f"unknown attention backend {self.attention_backend!r}")
        if self.tensor_parallel_size != 1:
            raise ConfigError("tensor_parallel_size > 1 is not supported yet")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ConfigError(f"max_logprobs must be a non-negative integer, got {self.max_logprobs!r}")
        sched, cache = self.scheduler_config, self.cache_config
        if sched.max_num_batched_tokens < cache.block_size:
            raise ConfigError(
                f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be at least the "
                f"block size ({cache.block_size})"
            )
        mlen = self.model_config.max_model_len
        if mlen is not None and not sched.enable_chunked_prefill and sched.max_num_batched_tokens < mlen:
            raise ConfigError(
                f"without chunked prefill, max_num_batched_tokens ({sched.max_num_batched_tokens}) "
                f"must be at least max_model_len ({mlen})"
            )

    def resolve(self) -> EngineConfig:
        """This config with `device="auto"` made concrete (cuda when available, else cpu); called
        where an engine is built (engine-core process, offline LLM), never while validating."""
        if self.device != "auto":
            return self
        return dataclasses.replace(self, device=_detect_device())

    def non_default_items(self) -> dict[str, Any]:
        """The settings that differ from their defaults, for one log line at start."""
        out: dict[str, Any] = {}
        for sub in (self, self.model_config, self.cache_config, self.scheduler_config,
                    self.compilation_config, self.structured_outputs_config):
            for f in dataclasses.fields(sub):
                value = getattr(sub, f.name)
                if f.name not in _SUB_CONFIGS and value != field_default(f):
                    out[f.name] = value
        return out


def field_default(f: dataclasses.Field[Any]) -> Any:
    """A config field's default value (None for a required field)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _detect_device() -> str:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


_SUB_CONFIGS: dict[str, type] = {
    "model_config": ModelConfig, "cache_config": CacheConfig,
    "scheduler_config": SchedulerConfig, "compilation_config": CompilationConfig,
    "structured_outputs_config": StructuredOutputsConfig}
_ENGINE_ARG_FIELDS = {f.name: sub_name for sub_name, sub_cls in _SUB_CONFIGS.items()
                      for f in dataclasses.fields(sub_cls)}
_ARG_ALIASES = {"scheduling_policy": "policy", "kv_cache_memory": "kv_cache_memory_bytes",
                "num_gpu_blocks": "num_gpu_blocks_override",
                "max_num_queued_requests": "max_num_queued_reqs"}


def engine_field(name: str) -> dataclasses.Field[Any]:
    """The config field behind a flat engine argument (aliases too), with its default and its
    help in the metadata; `fornax serve --help` is built from these."""
    name = _ARG_ALIASES.get(name, name)
    owner = _SUB_CONFIGS.get(_ENGINE_ARG_FIELDS.get(name, ""), EngineConfig)
    for f in dataclasses.fields(owner):
        if f.name == name and f.name not in _SUB_CONFIGS and f.name != "model":
            return f
    raise ConfigError(f"unknown engine argument {name!r}")

def queue_limits(config: SchedulerConfig, kv_capacity_tokens: int, max_model_len: int
                 ) -> tuple[int, int | None]:
    """(max in-flight requests, max waiting prompt tokens or None) once the KV cache is sized.

    Beyond the first, a request waits behind about `QUEUE_KV_MULTIPLE` full turnovers of the KV
    cache: past that a client does better retrying elsewhere (503 + Retry-After) than queueing.
    """
    reqs = config.max_num_queued_reqs
    if reqs is None:
        typical = max(1, min(QUEUE_TYPICAL_TOKENS, max_model_len))
        by_kv = QUEUE_KV_MULTIPLE * -(-max(kv_capacity_tokens, 1) // typical)
        reqs = max(QUEUE_MIN_BATCHES * config.max_num_seqs, by_kv)
    return reqs, config.max_num_queued_tokens


def make_engine_config(model: str, **kwargs: Any) -> EngineConfig:
    """Build an EngineConfig from flat vLLM-style keyword arguments (`max_model_len=...`)."""
    groups: dict[str, dict[str, Any]] = {name: {} for name in set(_ENGINE_ARG_FIELDS.values())}
    top: dict[str, Any] = {}
    top_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    for key, value in kwargs.items():
        key = _ARG_ALIASES.get(key, key)
        if key == "cuda_graph_sizes" and value is not None:
            value = tuple(value)
        if key in _ENGINE_ARG_FIELDS:
            groups[_ENGINE_ARG_FIELDS[key]][key] = value
        elif key in top_fields:
            top[key] = value
        else:
            raise ConfigError(f"unknown engine argument {key!r}")
    return EngineConfig(
        model_config=ModelConfig(model=model, **groups["model_config"]),
        cache_config=CacheConfig(**groups["cache_config"]),
        scheduler_config=SchedulerConfig(**groups["scheduler_config"]),
        compilation_config=CompilationConfig(**groups["compilation_config"]),
        structured_outputs_config=StructuredOutputsConfig(**groups["structured_outputs_config"]),
        **top,
    )
