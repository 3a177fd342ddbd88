"""SamplingParams: how one request decodes, validated with errors naming the field (any process)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from fornax.runtime.errors import RequestError
from fornax.runtime.limits import (
    DEFAULT_LIMITS,
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    LOGIT_BIAS_RANGE,
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_CHOICE_CHARS,
    MAX_CHOICE_OPTIONS,
    MAX_GRAMMAR_CHARS,
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_REPETITION_MIN_COUNT,
    MAX_REPETITION_PATTERN_SIZE,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_THINKING_TOKEN_BUDGET,
    InputLimits,
    clip_for_log,
)

__all__ = ["MAX_N", "RepetitionDetectionParams", "SamplingParams", "StructuredOutputsParams"]


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
    source: str | None = None  # the request field it came from, named by compile errors

    def validate(self) -> None:
        """Exactly one kind, and its raw text within the size caps (compile time is bounded
        where the grammar compiles)."""
        kinds = [k for k in _CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise RequestError("structured_outputs needs exactly one of json, regex, choice, "
                               f"grammar, json_object, structural_tag (got {kinds or 'none'})",
                               "structured_outputs")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or \
                    len(self.choice) > MAX_CHOICE_OPTIONS or not all(
                    isinstance(c, str) and len(c) <= MAX_CHOICE_CHARS for c in self.choice):
                raise RequestError(f"structured_outputs.choice must be a non-empty list of at "
                                   f"most {MAX_CHOICE_OPTIONS} strings of at most "
                                   f"{MAX_CHOICE_CHARS} characters", "structured_outputs.choice")
        for kind in ("json", "regex", "grammar", "structural_tag"):
            value = getattr(self, kind)
            if value is None:
                continue
            param = self.source or f"structured_outputs.{kind}"
            if not isinstance(value, (str, dict)) or (kind in ("regex", "grammar")
                                                      and not isinstance(value, str)):
                raise RequestError(f"structured_outputs.{kind} has the wrong type", param)
            size = len(value) if isinstance(value, str) else _json_size(value)
            if size > MAX_GRAMMAR_CHARS:
                raise RequestError(f"the {kind} constraint is {size} characters; at most "
                                   f"{MAX_GRAMMAR_CHARS} are accepted", param)

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
    # thinking_token_budget: after this many reasoning tokens the end-of-thinking marker
    # (thinking_end_ids) is forced; they count from the first output token, or from after
    # thinking_start_ids when the output has to open the thinking itself.
    thinking_token_budget: int | None = None
    thinking_end_ids: list[int] | None = None
    thinking_start_ids: list[int] | None = None

    def __post_init__(self) -> None:
        """Normalise shapes only (a str stop, dicts, str logit_bias keys): no validation here,
        so that msgspec decoding in the engine and `clone` stay cheap. `validate` runs once, at
        the edge (the API worker, or `LLM`)."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)) or self.stop is None:
            self.stop = list(self.stop or [])
        if isinstance(self.stop_token_ids, (list, tuple)) or self.stop_token_ids is None:
            self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                raise RequestError(f"structured_outputs: {exc}", "structured_outputs") from None
        if isinstance(self.repetition_detection, dict):
            try:
                self.repetition_detection = RepetitionDetectionParams(**self.repetition_detection)
            except TypeError as exc:
                raise RequestError(f"repetition_detection: {exc}",
                                   "repetition_detection") from None
        if isinstance(self.logit_bias, dict) and self.logit_bias:
            self.logit_bias = {_token_key(k): _as_float(v) for k, v in self.logit_bias.items()}

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        """True when decoding is plain argmax (temperature 0 or top_k 1)."""
        return self.temperature < 1e-5 or self.top_k == 1

    def validate(self, max_logprobs: int | None = None, vocab_size: int | None = None,
                 limits: InputLimits = DEFAULT_LIMITS) -> None:
        """Every rule on a request's decoding settings, in one place: types, machine ranges,
        meanings, list and string caps, and (given `vocab_size`) token ids inside the
        vocabulary. Raises RequestError naming the first invalid field. Runs once per request,
        at the edge."""
        self._validate_counts(limits)
        self._validate_floats()
        self._validate_lengths(max_logprobs)
        self._validate_stops(limits, vocab_size)
        self._validate_token_lists(vocab_size)
        rd = self.repetition_detection
        if rd is not None:
            if not isinstance(rd, RepetitionDetectionParams):
                raise RequestError("repetition_detection must be an object",
                                   "repetition_detection")
            _int_in("repetition_detection.min_pattern_size", rd.min_pattern_size, 1,
                    MAX_REPETITION_PATTERN_SIZE)
            _int_in("repetition_detection.max_pattern_size", rd.max_pattern_size,
                    rd.min_pattern_size, MAX_REPETITION_PATTERN_SIZE)
            _int_in("repetition_detection.min_count", rd.min_count, 2, MAX_REPETITION_MIN_COUNT)
        so = self.structured_outputs
        if so is not None:
            if not isinstance(so, StructuredOutputsParams):
                raise RequestError("structured_outputs must be an object", "structured_outputs")
            so.validate()
        if self.structured_outputs_after is not None:
            _token_ids("structured_outputs_after", self.structured_outputs_after, vocab_size,
                       MAX_STOP_TOKEN_IDS)
        if self.thinking_token_budget is not None:
            _int_in("thinking_token_budget", self.thinking_token_budget, 0,
                    MAX_THINKING_TOKEN_BUDGET)
            if not self.thinking_end_ids:
                raise RequestError("thinking_token_budget needs the end-of-thinking token ids "
                                   "(a reasoning model)", "thinking_token_budget")
            for name in ("thinking_end_ids", "thinking_start_ids"):
                if getattr(self, name) is not None:
                    _token_ids(name, getattr(self, name), vocab_size, MAX_STOP_TOKEN_IDS)

    def _validate_counts(self, limits: InputLimits) -> None:
        _int_in("n", self.n, 1, limits.max_n)
        if self.best_of is not None:
            _int_in("best_of", self.best_of, 1, limits.max_n)
            if self.best_of < self.n:
                raise RequestError(f"best_of must be between n ({self.n}) and {limits.max_n}, "
                                   f"got {self.best_of}", "best_of")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not (
                self.top_k in (-1, 0) or 1 <= self.top_k <= INT32_MAX):
            raise RequestError(f"top_k must be -1 (disabled) or in [1, {INT32_MAX}], got "
                               f"{clip_for_log(self.top_k, 64)}", "top_k")
        if self.seed is not None:
            _int_in("seed", self.seed, INT64_MIN, INT64_MAX)

    def _validate_floats(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {value}", name)
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 100.0:
            raise RequestError(f"repetition_penalty must be in (0, 100], got "
                               f"{self.repetition_penalty}", "repetition_penalty")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature < math.inf:
            raise RequestError(f"temperature must be a finite number >= 0, got "
                               f"{self.temperature}", "temperature")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")

    def _validate_lengths(self, max_logprobs: int | None) -> None:
        if self.max_tokens is not None:
            _int_in("max_tokens", self.max_tokens, 1, INT32_MAX)
        _int_in("min_tokens", self.min_tokens, 0, INT32_MAX)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                "min_tokens",
            )
        if self.truncate_prompt_tokens is not None:
            _int_in("truncate_prompt_tokens", self.truncate_prompt_tokens, -1, INT32_MAX)
            if self.truncate_prompt_tokens == 0:
                raise RequestError("truncate_prompt_tokens must be -1 or >= 1",
                                   "truncate_prompt_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            _int_in(name, value, -1, INT32_MAX)
            if max_logprobs is not None and value > max_logprobs:
                raise RequestError(
                    f"{name}={value} exceeds the server's --max-logprobs ({max_logprobs})", name)

    def _validate_stops(self, limits: InputLimits, vocab_size: int | None) -> None:
        if not isinstance(self.stop, list):
            raise RequestError("stop must be a string or a list of strings", "stop")
        if len(self.stop) > limits.max_stop_strings:
            raise RequestError(f"at most {limits.max_stop_strings} stop strings are allowed "
                               "(--max-stop-strings)", "stop")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
                raise RequestError(
                    f"each stop string must be a non-empty string of at most "
                    f"{MAX_STOP_STRING_CHARS} characters", "stop")
        _token_ids("stop_token_ids", self.stop_token_ids, vocab_size, MAX_STOP_TOKEN_IDS)

    def _validate_token_lists(self, vocab_size: int | None) -> None:
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
                raise RequestError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to "
                                   "biases", "logit_bias")
            _token_ids("logit_bias", list(bias), vocab_size, MAX_LOGIT_BIAS,
                       what="keys must be token ids")
            for tid, value in bias.items():
                if not _is_number(value) or not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
                    raise RequestError(f"logit_bias values must be in [-100, 100], got {value} "
                                       f"for token {tid}", "logit_bias")
        if self.allowed_token_ids is not None:
            if isinstance(self.allowed_token_ids, list) and not self.allowed_token_ids:
                raise RequestError("allowed_token_ids must not be empty", "allowed_token_ids")
            _token_ids("allowed_token_ids", self.allowed_token_ids, vocab_size,
                       min(MAX_ALLOWED_TOKEN_IDS, vocab_size or MAX_ALLOWED_TOKEN_IDS))
        if self.bad_words is not None:
            if not isinstance(self.bad_words, list) or len(self.bad_words) > MAX_BAD_WORDS:
                raise RequestError(f"bad_words must be a list of at most {MAX_BAD_WORDS} strings",
                                   "bad_words")
            for word in self.bad_words:
                if not isinstance(word, str) or not word.strip() or \
                        len(word) > MAX_BAD_WORD_CHARS:
                    raise RequestError(f"each bad word must be a non-blank string of at most "
                                       f"{MAX_BAD_WORD_CHARS} characters", "bad_words")
        if self.bad_words_token_ids is not None:
            words = self.bad_words_token_ids
            if not isinstance(words, list) or len(words) > 2 * MAX_BAD_WORDS:
                raise RequestError("bad_words_token_ids must be a list of token-id lists",
                                   "bad_words")
            for ids in words:
                if isinstance(ids, list) and not ids:
                    raise RequestError("a bad word tokenizes to nothing", "bad_words")
                _token_ids("bad_words", ids, vocab_size, MAX_BAD_WORD_CHARS)

    def clone(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (not re-validated: the edge validated the original)."""
        return replace(self, **changes)

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in [{low}, {high}], got "
                           f"{clip_for_log(value, 64)}", name)


def _token_ids(name: str, ids: Any, vocab_size: int | None, max_len: int,
               what: str = "must be a list of token ids") -> None:
    """A list of token ids: at most `max_len`, each in [0, vocab_size) (int32 without one)."""
    if not isinstance(ids, list):
        raise RequestError(f"{name} {what}", name)
    if len(ids) > max_len:
        raise RequestError(f"{name} holds {len(ids)} token ids; at most {max_len} are accepted",
                           name)
    high = vocab_size if vocab_size is not None else INT32_MAX + 1
    for t in ids:
        if not _is_int(t):
            raise RequestError(f"{name} {what}, got {clip_for_log(t, 64)}", name)
        if not 0 <= t < high:
            raise RequestError(f"{name} has token id {t} outside the vocabulary (size {high})",
                               name)


def _token_key(key: Any) -> Any:
    """A logit_bias key as an int when it is one ("12", 12); anything else is left for
    `validate` to refuse (`"²".isdigit()` is True: only ASCII digits count)."""
    if _is_int(key):
        return key
    if isinstance(key, str) and _INT_KEY.match(key):
        return int(key)
    return key


_INT_KEY = re.compile(r"-?[0-9]{1,19}\Z")


def _as_float(value: Any) -> Any:
    return float(value) if _is_int(value) else value


def _json_size(value: Any) -> int:
    try:
        return len(json.dumps(value))
    except (TypeError, ValueError, RecursionError):
        raise RequestError("structured_outputs holds a value that is not JSON",
                           "structured_outputs") from None
