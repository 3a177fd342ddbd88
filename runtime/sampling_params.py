"""SamplingParams: how one request decodes, validated with errors naming the field (any process)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from fornax.runtime.errors import RequestError

_MAX_STOP_STRINGS = 64
_MAX_STOP_STRING_LEN = 1024
MAX_N = 128


@dataclass
class RepetitionDetectionParams:
    """Stop a generation whose tail repeats one pattern `min_count` times in a row."""

    max_pattern_size: int = 64
    min_pattern_size: int = 1
    min_count: int = 4


_CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """One output constraint with vLLM's `structured_outputs` names; exactly one kind is set."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        kinds = [k for k in _CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise RequestError("structured_outputs needs exactly one of json, regex, choice, "
                               f"grammar, json_object, structural_tag (got {kinds or 'none'})",
                               "structured_outputs")
        if self.choice is not None and (not self.choice or not all(
                isinstance(c, str) for c in self.choice)):
            raise RequestError("structured_outputs.choice must be a non-empty list of strings",
                               "structured_outputs.choice")

    @property
    def kind(self) -> str:
        return next(k for k in _CONSTRAINT_KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> str:
        import json as _json

        value = getattr(self, self.kind)
        text = value if isinstance(value, str) else _json.dumps(value, sort_keys=True)
        flags = f"{int(self.disable_any_whitespace)}{int(self.disable_additional_properties)}"
        return f"{self.kind}\x00{flags}\x00{text}"


@dataclass
class SamplingParams:
    """Per-request decoding settings, with vLLM's names and defaults."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None  # filled from bad_words by the front end
    truncate_prompt_tokens: int | None = None
    repetition_detection: RepetitionDetectionParams | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # With a reasoning model, the constraint starts once the output ends with these token ids
    # (the end-of-thinking marker); None: it applies from the first token.
    structured_outputs_after: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.repetition_detection, dict):
            self.repetition_detection = RepetitionDetectionParams(**self.repetition_detection)
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        """True when decoding is plain argmax (temperature 0 or top_k 1)."""
        return self.temperature < 1e-5 or self.top_k == 1

    def validate(self, max_logprobs: int | None = None) -> None:
        """Raise RequestError naming the first invalid field."""
        _int_at_least("n", self.n, 1)
        if self.n > MAX_N:
            raise RequestError(f"n must be at most {MAX_N}, got {self.n}", "n")
        if self.best_of is not None:
            _int_at_least("best_of", self.best_of, 1)
            if self.best_of < self.n or self.best_of > MAX_N:
                raise RequestError(f"best_of must be between n ({self.n}) and {MAX_N}, got "
                                   f"{self.best_of}", "best_of")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {value}", name)
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 100.0:
            raise RequestError(f"repetition_penalty must be in (0, 100], got "
                               f"{self.repetition_penalty}", "repetition_penalty")
        for tid, bias in (self.logit_bias or {}).items():
            if not -100.0 <= bias <= 100.0:
                raise RequestError(f"logit_bias values must be in [-100, 100], got {bias} for "
                                   f"token {tid}", "logit_bias")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise RequestError("allowed_token_ids must not be empty", "allowed_token_ids")
            for t in self.allowed_token_ids:
                _int_at_least("allowed_token_ids", t, 0)
        if self.truncate_prompt_tokens is not None:
            _int_at_least("truncate_prompt_tokens", self.truncate_prompt_tokens, -1)
            if self.truncate_prompt_tokens == 0:
                raise RequestError("truncate_prompt_tokens must be -1 or >= 1",
                                   "truncate_prompt_tokens")
        rd = self.repetition_detection
        if rd is not None:
            _int_at_least("repetition_detection.min_pattern_size", rd.min_pattern_size, 1)
            _int_at_least("repetition_detection.max_pattern_size", rd.max_pattern_size,
                          rd.min_pattern_size)
            _int_at_least("repetition_detection.min_count", rd.min_count, 2)
        if not _is_number(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or (
            self.top_k < 1 and self.top_k not in (-1, 0)
        ):
            raise RequestError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}", "top_k")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}", "seed")
        if self.max_tokens is not None:
            _int_at_least("max_tokens", self.max_tokens, 1)
        _int_at_least("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                "min_tokens",
            )
        if len(self.stop) > _MAX_STOP_STRINGS:
            raise RequestError(f"at most {_MAX_STOP_STRINGS} stop strings are allowed", "stop")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > _MAX_STOP_STRING_LEN:
                raise RequestError(
                    f"each stop string must be a non-empty string of at most "
                    f"{_MAX_STOP_STRING_LEN} characters", "stop")
        for t in self.stop_token_ids:
            _int_at_least("stop_token_ids", t, 0)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            _int_at_least(name, value, -1)
            if max_logprobs is not None and value > max_logprobs:
                raise RequestError(
                    f"{name}={value} exceeds the server's --max-logprobs ({max_logprobs})", name)

    def clone(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (re-validated)."""
        return replace(self, **changes)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _int_at_least(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise RequestError(f"{name} must be an integer >= {low}, got {value!r}", name)
