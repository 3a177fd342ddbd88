"""The engine contract: what the engine-core process and the offline APIs may call on an engine
core, with the optional features as typed capabilities (engine-core process, offline `LLM`).

Three cores satisfy it: `GenerateEngineCore` (runtime/engine/generate_core.py),
`PoolingEngineCore` (runtime/pooling/core.py) and `EncoderDecoderEngineCore`
(runtime/encoder_decoder/core.py); `make_engine_core` (runtime/engine/factory.py) picks one. A
feature one core lacks is a capability that is None there (`structured`, `pooling_info`,
`sleep_mode`), never an attribute to probe for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NotRequired, Protocol, TypedDict

if TYPE_CHECKING:  # torch-free at import time: the API workers read RunnerType and the info
    from fornax.runtime.config import EngineConfig
    from fornax.runtime.engine.messages import EngineCoreOutput, EngineCoreRequest, PoolingModelInfo
    from fornax.runtime.loaders.model_files import ModelFiles
    from fornax.runtime.structured_output.grammar import StructuredOutputManager

# What a core serves, as the READY handshake reports it (the API picks its routes by it).
RunnerType = Literal["generate", "pooling", "transcription"]


@dataclass(frozen=True)
class EngineRuntimeInfo:
    """What the engine found at start (not configuration): capacity and limits. Cores without a
    paged KV cache (pooling) leave the KV fields 0."""

    max_model_len: int
    vocab_size: int
    architecture: str
    dtype: str
    device: str
    num_kv_blocks: int = 0
    block_size: int = 0
    eos_token_ids: frozenset[int] = frozenset()

    @property
    def kv_capacity_tokens(self) -> int:
        """Usable KV tokens (block 0 is the null block); 0 without a KV cache."""
        return max(0, (self.num_kv_blocks - 1) * self.block_size)


class EngineLoad(TypedDict):
    """`EngineCore.stats()`: the numbers for /metrics and /load (fields of EngineStats)."""

    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    iteration_tokens_counts: NotRequired[list[int]]  # per-step token histogram (stats.py)
    iteration_tokens_sum: NotRequired[int]
    sleep_level: NotRequired[int]  # 0 awake


class SchedulerView(Protocol):
    """The part of a core's scheduler the process reads (from its input thread too: counters
    and lengths only)."""

    @property
    def requests(self) -> Mapping[str, object]:
        """The live requests (waiting or running) by request id."""
        ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting_prompt_tokens(self) -> int:
        """Prompt tokens of the waiting requests (--max-num-queued-tokens counts these)."""
        ...


class SleepMode(Protocol):
    """The dev endpoints' memory controls (POST /sleep, /wake_up, /reset_prefix_cache)."""

    @property
    def is_sleeping(self) -> bool: ...

    def sleep(self, level: int = 1) -> None:
        """Free memory while idle (RequestError while requests are in flight)."""
        ...

    def wake_up(self) -> None: ...

    def reset_prefix_cache(self) -> bool:
        """False while running requests hold cached blocks."""
        ...


class EngineCore(Protocol):
    """One engine core: admission (`validate_request`, `add_request`), the busy loop's body
    (`step`), `abort_requests`, load numbers, what it found at start, and its capabilities."""

    config: EngineConfig
    files: ModelFiles
    info: EngineRuntimeInfo
    max_model_len: int
    num_steps: int

    @property
    def scheduler(self) -> SchedulerView: ...

    # ---- capabilities: what a core does not offer is None (runner_type says what it serves) --
    @property
    def runner_type(self) -> RunnerType: ...

    @property
    def structured(self) -> StructuredOutputManager | None:
        """Constrained decoding: grammars compile here (generate only)."""
        ...

    @property
    def pooling_info(self) -> PoolingModelInfo | None:
        """What a pooling model serves and how it pools (pooling only)."""
        ...

    @property
    def sleep_mode(self) -> SleepMode | None:
        """Sleep, wake up, reset the prefix cache (generate only)."""
        ...

    def validate_request(self, req: EngineCoreRequest) -> object:
        """Raise RequestError (a 400 naming the field) if this core cannot serve `req`."""
        ...

    def add_request(self, req: EngineCoreRequest) -> object:
        """Validate and queue `req` (RequestError if refused); it runs in later steps."""
        ...

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        """End these requests now (unknown ids are ignored); one "abort" output each."""
        ...

    def step(self) -> list[EngineCoreOutput]:
        """One scheduling step; a failure fails requests, not the engine (EngineStepError
        when the engine itself cannot go on)."""
        ...

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> EngineLoad: ...
