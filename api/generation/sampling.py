"""Request fields -> SamplingParams, prompt checks, refusal of unbuilt features (API workers)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fornax.api.server.errors import APIError
from fornax.api.protocol.openai import _SamplingFields
from fornax.runtime.errors import RequestError
from fornax.runtime.limits import DEFAULT_LIMITS, InputLimits
from fornax.runtime.sampling.request_prep import prepare_sampling_params
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.text.tokenizer import TokenizerFront

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}

# Sampling knobs passed to the engine when SamplingParams has the field, else a 400 when set to
# anything but their neutral value (never silently ignored).
_PASS_THROUGH: dict[str, Any] = {
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
    "logit_bias": None, "allowed_token_ids": None, "bad_words": None, "prompt_logprobs": None,
    "repetition_detection": None, "best_of": None,
}
_REPETITION_KEYS = {"max_pattern_size", "min_pattern_size", "min_count"}


def _not_supported(field: str, what: str | None = None) -> APIError:
    return APIError(400, f"{what or field} is not supported by this server yet", field)


def _is_set(value: Any, neutral: Any) -> bool:
    return value is not None and value != neutral and value != {}


def check_unsupported(req: _SamplingFields, *, structured: bool = False) -> None:
    """400 for features fornax does not have yet, naming the field. `structured`: the caller
    enforces output constraints (fornax.api.generation.structured); other callers refuse them."""
    if req.length_penalty not in (None, 1.0) and not req.use_beam_search:
        raise APIError(400, "length_penalty applies to beam search only (use_beam_search)",
                       "length_penalty")
    fmt = req.response_format
    if fmt is not None and not structured:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", None):
            raise _not_supported("response_format", f"response_format {kind!r} (structured output)")
    for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar"):
        if getattr(req, name) is not None and not structured:
            raise _not_supported(name, f"{name} (structured output)")
    for name, neutral in _PASS_THROUGH.items():
        if name not in _ENGINE_FIELDS and _is_set(getattr(req, name, None), neutral):
            raise _not_supported(name)
    rd = req.repetition_detection
    if rd is not None and not set(rd) <= _REPETITION_KEYS:
        raise APIError(400, f"repetition_detection accepts {sorted(_REPETITION_KEYS)}",
                       "repetition_detection")
    # priority, request_id, ...: bounded while decoding (api/protocol/bounded.py); logit_bias,
    # seed and every other decoding setting: SamplingParams.validate, once (build_sampling_params)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options can only be set when stream is true",
                       "stream_options")
    if req.stream and req.best_of is not None and req.best_of > (req.n or 1):
        raise APIError(400, "best_of larger than n cannot be streamed", "best_of")


def build_sampling_params(req: _SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                          defaults: dict[str, Any], max_logprobs: int, tokenizer: TokenizerFront,
                          vocab_size: int, extra: dict[str, Any] | None = None,
                          limits: InputLimits = DEFAULT_LIMITS) -> SamplingParams:
    """SamplingParams from a chat or completions request, validated once here (the engine does
    not check them again); RequestError -> 400 naming the field."""
    n = 1 if req.n is None else req.n
    kwargs: dict[str, Any] = {
        "n": n,
        "temperature": _pick(req.temperature, defaults, "temperature", 1.0),
        "top_p": _pick(req.top_p, defaults, "top_p", 1.0),
        "top_k": _pick(req.top_k, defaults, "top_k", -1),
        "min_p": _pick(req.min_p, defaults, "min_p", 0.0),
        "seed": req.seed,
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        "stop_token_ids": list(req.stop_token_ids or []),
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "ignore_eos": req.ignore_eos,
        "logprobs": logprobs,
        "skip_special_tokens": req.skip_special_tokens,
        "spaces_between_special_tokens": req.spaces_between_special_tokens,
        "detokenize": req.detokenize,
    }
    if kwargs["top_k"] == 0:
        kwargs["top_k"] = -1
    for name, neutral in _PASS_THROUGH.items():
        value = getattr(req, name, None)
        if name in _ENGINE_FIELDS and _is_set(value, neutral):
            kwargs[name] = value
    kwargs.update(extra or {})
    try:
        params = prepare_sampling_params(SamplingParams(**kwargs), tokenizer, vocab_size,
                                         max_logprobs, limits)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param) from None
    return params


def _pick(value: Any, defaults: dict[str, Any], name: str, fallback: Any) -> Any:
    if value is not None:
        return value
    return defaults.get(name, fallback)


def check_prompt(token_ids: list[int], max_model_len: int, vocab_size: int, param: str) -> None:
    """400 for an empty prompt, one that leaves no room for output, or out-of-vocab ids."""
    if not token_ids:
        raise APIError(400, "the prompt is empty (it has no tokens)", param)
    if len(token_ids) >= max_model_len:
        raise APIError(
            400, f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {len(token_ids)} tokens, leaving no room for output. Please shorten the prompt.",
            param)
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of vocabulary (size {vocab_size})", param)


def truncate_prompt(token_ids: list[int], truncate: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last k tokens (-1: the model's context length)."""
    if truncate is None:
        return token_ids
    if truncate == -1:
        truncate = max_model_len
    if truncate < 1 or truncate > max_model_len:
        raise APIError(400, f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}], got "
                       f"{truncate}", "truncate_prompt_tokens")
    return token_ids[-truncate:]


def resolve_max_tokens(requested: int | None, default: int | None, prompt_len: int,
                       max_model_len: int, param: str = "max_tokens") -> int:
    """max_tokens clamped to the context left (not an error); < 1 is a 400."""
    room = max_model_len - prompt_len
    value = requested if requested is not None else default
    if value is None:
        return room
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise APIError(400, f"{param} must be an integer >= 1, got {value!r}", param)
    return min(value, room)
