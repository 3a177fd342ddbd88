"""Frozen engine configuration, validated on construction (any process)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fornax.runtime.errors import ConfigError

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_POLICIES = ("fcfs", "priority")
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "fp32": "float32", "fp16": "float16",
                  "bf16": "bfloat16"}


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how: path, format, dtype, context length, seed."""

    model: str
    tokenizer: str | None = None
    served_model_name: tuple[str, ...] = ()
    dtype: str = "auto"
    max_model_len: int | None = None
    load_format: str = "auto"
    seed: int = 0
    generation_config: str = "auto"
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    runner: str = "auto"  # auto | generate | pooling (auto: by architecture)
    pooler_config: dict[str, Any] = field(default_factory=dict)  # pooling_type, normalize

    def __post_init__(self) -> None:
        if self.runner not in ("auto", "generate", "pooling"):
            raise ConfigError(f"runner must be 'auto', 'generate' or 'pooling', got {self.runner!r}")
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        object.__setattr__(self, "dtype", dtype)
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.load_format not in _LOAD_FORMATS:
            raise ConfigError(
                f"load_format must be one of {', '.join(_LOAD_FORMATS)}, got {self.load_format!r}"
            )
        _positive("max_model_len", self.max_model_len)
        if self.generation_config not in ("auto", "fornax", "vllm"):
            raise ConfigError("generation_config must be 'auto' or 'fornax'")
        if isinstance(self.served_model_name, str):
            object.__setattr__(self, "served_model_name", (self.served_model_name,))


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size, capacity, prefix caching."""

    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9

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

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"
    # admission (vLLM's names): in-flight requests (waiting + running) and prompt tokens waiting;
    # None = the default, sized from the KV cache at start (see queue_limits)
    max_num_queued_reqs: int | None = None
    max_num_queued_tokens: int | None = None

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_num_queued_reqs", self.max_num_queued_reqs)
        _positive("max_num_queued_tokens", self.max_num_queued_tokens)
        if self.policy not in _POLICIES:
            raise ConfigError(f"scheduling policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass(frozen=True)
class CompilationConfig:
    """torch.compile and CUDA-graph settings (used by graphs/)."""

    enforce_eager: bool | None = None  # None: eager on CPU, compiled + CUDA graphs on GPU
    cuda_graph_sizes: tuple[int, ...] = ()
    use_cuda_graphs: bool = True  # False: compiled but no CUDA graphs (benchmarks compare both)
    max_capture_size: int = 256

    def __post_init__(self) -> None:
        for size in self.cuda_graph_sizes:
            _positive("cuda_graph_sizes entry", size)
        _positive("max_capture_size", self.max_capture_size)


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """Bounds on grammar compilation (runtime/structured_output/grammar_pool.py, runtime/structured_output/grammar_cache.py).

    xgrammar's compile cannot be interrupted: a compile past its time limit is answered at once
    ("grammar too complex", 400) while its thread runs on, so at most `grammar_compile_threads`
    compiles ever run. A compile also waits at most the time limit for a free thread (then 503).
    """

    grammar_compile_timeout_s: float = 10.0  # one compile, then 400
    grammar_compile_threads: int = 2
    grammar_max_pending_compiles: int = 64  # compiles queued or running, then 503
    grammar_cache_bytes: int = 512 * 2**20  # compiled grammars kept (LRU by memory size)
    grammar_max_failures: int = 1024  # refused specs remembered (refused again at once)
    grammar_max_waiting_requests: int = 4096  # requests held for their compile, then 503

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
    """Everything the engine core needs, made once from the CLI or `LLM(...)` arguments."""

    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    compilation_config: CompilationConfig = field(default_factory=CompilationConfig)
    structured_outputs_config: StructuredOutputsConfig = field(
        default_factory=StructuredOutputsConfig)
    device: str = "cpu"
    attention_backend: str = "auto"
    max_logprobs: int = 20
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.device == "auto":
            object.__setattr__(self, "device", _detect_device())
        if self.attention_backend not in ("auto", "torch_ref", "cpu_paged", "flashinfer"):
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

    def non_default_items(self) -> dict[str, Any]:
        """The settings that differ from their defaults, for one log line at start."""
        out: dict[str, Any] = {}
        for sub in (self.model_config, self.cache_config, self.scheduler_config,
                    self.compilation_config, self.structured_outputs_config):
            for f in dataclasses.fields(sub):
                value = getattr(sub, f.name)
                default = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                if value != default:
                    out[f.name] = value
        return out


def _detect_device() -> str:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


_ENGINE_ARG_FIELDS: dict[str, str] = {}
for _sub_name, _sub_cls in (("model_config", ModelConfig), ("cache_config", CacheConfig),
                            ("scheduler_config", SchedulerConfig),
                            ("compilation_config", CompilationConfig),
                            ("structured_outputs_config", StructuredOutputsConfig)):
    for _f in dataclasses.fields(_sub_cls):
        _ENGINE_ARG_FIELDS[_f.name] = _sub_name
_ARG_ALIASES = {"scheduling_policy": "policy", "kv_cache_memory": "kv_cache_memory_bytes",
                "num_gpu_blocks": "num_gpu_blocks_override",
                "max_num_queued_requests": "max_num_queued_reqs"}

# The default admission bound: enough in-flight requests to fill the KV cache QUEUE_KV_MULTIPLE
# times over at QUEUE_TYPICAL_TOKENS tokens a request (prompt + output), and never fewer than
# QUEUE_MIN_BATCHES full batches (--max-num-seqs), so a small cache still keeps the batch full.
QUEUE_KV_MULTIPLE = 4
QUEUE_TYPICAL_TOKENS = 1024
QUEUE_MIN_BATCHES = 2


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
        if key == "served_model_name" and isinstance(value, list):
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


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON file, raising ConfigError with the path when it is malformed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
