"""What the three engine cores share: prompt checks, KV sizing, runtime info, abort and stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fornax.runtime.errors import ConfigError, RequestError
from fornax.runtime.kv_cache.kv_cache_manager import cdiv
from fornax.runtime.loaders.model_files import ModelFiles
from fornax.runtime.messages import EngineCoreOutput


@dataclass(frozen=True)
class EngineRuntimeInfo:
    """What the engine found at start (not configuration): capacity and limits."""

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    architecture: str
    dtype: str
    device: str

    @property
    def kv_capacity_tokens(self) -> int:
        return (self.num_kv_blocks - 1) * self.block_size


def eos_token_ids(files: ModelFiles) -> frozenset[int]:
    """The end-of-sequence ids named by generation_config.json and config.json."""
    ids: set[int] = set()
    for source in (files.generation_config, files.hf_config):
        value = source.get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def runtime_info(runner: Any, files: ModelFiles, num_blocks: int, block_size: int,
                 max_model_len: int, device: str) -> EngineRuntimeInfo:
    """The runtime info of a core whose runner has a paged KV cache."""
    return EngineRuntimeInfo(
        num_kv_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len,
        vocab_size=runner.vocab_size, eos_token_ids=eos_token_ids(files),
        architecture=runner.arch, dtype=str(runner.dtype).removeprefix("torch."), device=device)


def allocate_kv_cache(runner: Any, block_size: int, max_model_len: int, advice: str) -> int:
    """Size the runner's paged KV cache, refuse one that cannot hold a whole sequence, allocate it.

    Returns the number of blocks (block 0 is the null block, so one less is usable)."""
    num_blocks = runner.determine_num_blocks()
    if (num_blocks - 1) < cdiv(max_model_len, block_size):
        raise ConfigError(
            f"the KV cache holds {(num_blocks - 1) * block_size} tokens, less than one "
            f"sequence of max_model_len {max_model_len}; {advice}")
    runner.initialize_kv_cache(num_blocks)
    return num_blocks


def check_prompt_ids(prompt: list[int], vocab_size: int, field: str,
                     noun: str = "prompt") -> None:
    """A request's token ids: at least one, each inside the vocabulary (else a 400)."""
    if not prompt:
        raise RequestError(f"the {noun} must contain at least one token", field)
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        bad = next(t for t in prompt if t < 0 or t >= vocab_size)
        raise RequestError(f"token id {bad} is out of vocabulary (size {vocab_size})", field)


class SchedulingCoreMixin:
    """Admission bookkeeping shared by the cores: `self.scheduler` holds the live requests."""

    scheduler: Any
    reports_prefix_cache = True  # False where the cache never shares blocks (encoder-decoder)

    def ensure_new_request_id(self, request_id: str) -> None:
        if request_id in self.scheduler.requests:
            raise RequestError(f"request id {request_id!r} is already running", "request_id")

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return [EngineCoreOutput(r.request_id, [], finish_reason="abort",
                                 num_prompt_tokens=r.num_prompt_tokens,
                                 num_cached_tokens=max(getattr(r, "num_cached_tokens", 0), 0))
                for r in self.scheduler.abort_requests(request_ids)]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> dict[str, Any]:
        """Numbers for metrics and /load; cores without a KV cache or preemption report 0."""
        kv = getattr(self, "kv", None)
        kv_stats = kv.stats if kv is not None and self.reports_prefix_cache else None
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_usage": kv.usage() if kv is not None else 0.0,
            "prefix_cache_queries": kv_stats.queries if kv_stats is not None else 0,
            "prefix_cache_hits": kv_stats.hits if kv_stats is not None else 0,
            "num_preemptions": getattr(self.scheduler, "num_preemptions", 0),
        }
