"""PrefillBudget: how many prompt tokens a step may take while streams decode, from an online
model of what a step costs (engine-core process).

A step that prefills a long prompt in one go stalls every running decode for as long as the
prompt takes. While requests decode, the scheduler therefore caps a step's prompt tokens so the
step should take about `itl_factor` times a pure-decode step: the engine times every step and
feeds `StepCostModel` (exponential moving averages of the pure-decode step time and of the extra
time per prompt token); the cap is `(itl_factor - 1) * decode_s / prefill_s_per_token`, never
below `MIN_PREFILL_CHUNK` so a prompt always makes progress. With no decode running, or before
the model has seen both kinds of step, or with `itl_factor` 0, only the fixed token budget
(--max-num-batched-tokens) applies, so an idle server gives a prompt its whole budget (TTFT).

Where the model runs steps of up to N tokens on a faster path (the fused CPU decode call,
kernels/fused_decode.py: one C call for the whole layer stack, against ~20 ms of per-op dispatch
for a larger step), a capped step keeps its prompt chunk within what is left of N beside the
decodes: a chunk that spilled over would cost every stream the slow path's overhead, so the cap
bought nothing (measured: the 32-token floor alone made ITL p95 2x worse on a quiet Xeon). On
the fast path a prompt token costs about what it costs in a whole-prompt step (one thread of the
Xeon: ~0.95 against ~0.75 ms, the decodes riding along for free), so there the floor is
MIN_FAST_CHUNK and the ITL factor is met down to small chunks.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

logger = logging.getLogger(__name__)

MIN_PREFILL_CHUNK = 32  # prompt tokens a step may always take, however slow prefill measures
MIN_FAST_CHUNK = 8  # the fast path's room beside the decodes is used when at least this big
EMA_ALPHA = 0.2  # weight of the newest step in the moving averages


class CostModel(Protocol):
    """What the budget reads: seconds of a pure-decode step and per prompt token (None: unknown
    yet). Tests inject a fixed one."""

    @property
    def decode_s(self) -> float | None: ...

    @property
    def prefill_s_per_token(self) -> float | None: ...


class StepCostModel:
    """Online estimate of a step's cost: the pure-decode step time, and the time each prompt
    token adds to a step (from steps with prompt tokens, less the decode step they rode on; a
    ratio of moving sums, so a big chunk weighs more than a small one)."""

    def __init__(self, alpha: float = EMA_ALPHA) -> None:
        self.alpha = alpha
        self._decode_s: float | None = None
        self._extra_s: float | None = None  # EMA of (step time - decode step) in prefill steps
        self._tokens: float | None = None  # EMA of the prompt tokens of those steps

    @property
    def decode_s(self) -> float | None:
        return self._decode_s

    @property
    def prefill_s_per_token(self) -> float | None:
        if self._extra_s is None or not self._tokens:
            return None
        return self._extra_s / self._tokens

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)

    def observe(self, num_decode_reqs: int, num_prefill_tokens: int, seconds: float) -> None:
        """One finished step: how many requests decoded, how many prompt tokens it ran, and how
        long it took (schedule to outputs). Nonsense times (negative, NaN) are ignored."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        if num_prefill_tokens <= 0:
            if num_decode_reqs > 0:
                self._decode_s = self._ema(self._decode_s, seconds)
            return
        # a step also pays the fixed cost of any step (the weights read once, the dispatch):
        # what the decode step costs, once it is known
        extra = max(seconds - (self._decode_s or 0.0), 0.0)
        self._extra_s = self._ema(self._extra_s, extra)
        self._tokens = self._ema(self._tokens, float(num_prefill_tokens))


class PrefillBudget:
    """The cap on a step's prompt tokens while requests decode (None: no cap beyond the token
    budget). `itl_factor` 0 turns it off."""

    def __init__(self, itl_factor: float, model: CostModel | None = None,
                 min_chunk: int = MIN_PREFILL_CHUNK) -> None:
        self.itl_factor = itl_factor
        self.model: CostModel = model if model is not None else StepCostModel()
        self.min_chunk = min_chunk
        # the most tokens a step may have to run on the model's fast path (0: none); the engine
        # sets it from the model runner, and resets it when the weights come and go (sleep)
        self.fast_tokens = 0

    def cap(self, num_decodes: int) -> int | None:
        """The most prompt tokens for a step beside `num_decodes` decoding requests."""
        if num_decodes <= 0 or self.itl_factor <= 0:
            return None
        decode_s, per_token = self.model.decode_s, self.model.prefill_s_per_token
        if decode_s is None or per_token is None or per_token <= 0:
            fit = None  # not measured yet, or prompt tokens measured free: the fixed budget
        else:
            fit = int((self.itl_factor - 1.0) * decode_s / per_token)
        room = self.fast_tokens - num_decodes
        if room >= MIN_FAST_CHUNK:  # stay on the fast path, where a small chunk costs no
            # overhead beyond the decodes' own step: a floor of MIN_FAST_CHUNK suffices
            return room if fit is None else min(max(fit, MIN_FAST_CHUNK), room)
        return None if fit is None else max(self.min_chunk, fit)

    def observe(self, num_decode_reqs: int, num_prefill_tokens: int, seconds: float) -> None:
        """Feed the model, where it is the online one (an injected model stays as it is)."""
        if isinstance(self.model, StepCostModel):
            self.model.observe(num_decode_reqs, num_prefill_tokens, seconds)
