"""Request: the engine core's state of one sequence being generated (engine-core process)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fornax.runtime.sampling.params import SamplingParams

if TYPE_CHECKING:
    import xgrammar as xgr


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6  # failed while being served (its client gets the error, not tokens)

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """Token ids so far, how many of them have KV in the cache, and how the request ends."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    cache_salt: str | None = None
    share_group: str | None = None  # siblings (n > 1) share prompt blocks even without caching
    arrival_time: float = field(default_factory=time.monotonic)
    max_tokens: int = 16  # resolved by the engine: never past max_model_len

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit length at first scheduling; -1 before
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    grammar: xgr.GrammarMatcher | None = None  # when the output is constrained
    grammar_active: bool = True  # False until the end-of-thinking marker (reasoning models)
    num_prompt_logprobs_sent: int = 0  # prompt positions whose logprobs went out (preemption-safe)
    # engine timestamps (time.monotonic) for the phase metrics: queued here, first scheduled,
    # first output token (0.0: not yet)
    queued_time: float = field(default_factory=time.monotonic)
    scheduled_time: float = 0.0
    first_token_time: float = 0.0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def sort_key(self) -> tuple[int, float]:
        """Order for the priority policy: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time)
