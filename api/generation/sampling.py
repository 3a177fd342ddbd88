"""Request fields -> SamplingParams, prompt checks, refusal of unbuilt features (API workers)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from fornax.api.protocol.openai import _SamplingFields
from fornax.api.server.errors import APIError
from fornax.runtime.errors import RequestError
from fornax.runtime.limits import DEFAULT_LIMITS, InputLimits
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.sampling.request_prep import (
    check_prompt,
    prepare_sampling_params,
    resolve_max_tokens,
    truncate_prompt,
)
from fornax.runtime.text.tokenizer import TokenizerFront

if TYPE_CHECKING:
    from fornax.api.server.state import AppState

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
    check_xargs(req.vllm_xargs)
    if req.stream and req.best_of is not None and req.best_of > (req.n or 1):
        raise APIError(400, "best_of larger than n cannot be streamed", "best_of")


def check_xargs(xargs: dict[str, Any] | None) -> None:
    """vllm_xargs: vLLM hands these to custom logits processors; fornax loads none, so an empty
    object is accepted and any key is a 400 naming it (never silently dropped)."""
    if xargs:
        key = next(iter(xargs))
        raise APIError(400, f"vllm_xargs key {key[:64]!r} is not supported: this server has no "
                       "custom logits-processor extensions to pass it to",
                       f"vllm_xargs.{key[:64]}")


def build_sampling_params(req: _SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                          defaults: dict[str, Any], max_logprobs: int, tokenizer: TokenizerFront,
                          vocab_size: int, extra: dict[str, Any] | None = None,
                          limits: InputLimits = DEFAULT_LIMITS,
                          logprobs_param: str = "logprobs") -> SamplingParams:
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
    except RequestError as exc:  # chat asks for logprobs as top_logprobs
        param = logprobs_param if exc.param == "logprobs" else exc.param
        raise APIError(400, str(exc).replace("logprobs", logprobs_param, 1)
                       if param != exc.param else str(exc), param) from None
    return params


def _pick(value: Any, defaults: dict[str, Any], name: str, fallback: Any) -> Any:
    if value is not None:
        return value
    return defaults.get(name, fallback)


def front_prompt(state: AppState, token_ids: list[int], truncate: int | None,
                 param: str, side: str | None = None) -> list[int]:
    """The prompt ids the engine gets: truncated (truncate_prompt_tokens, from the left unless
    truncation_side is "right") and checked, by the front end the offline LLM shares (400
    naming the field)."""
    try:
        token_ids = truncate_prompt(token_ids, truncate, state.max_model_len, side)
        check_prompt(token_ids, state.max_model_len, state.engine_info.vocab_size, param)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param) from None
    return token_ids


def front_max_tokens(state: AppState, requested: int | None, prompt_len: int, param: str,
                     default: int | None) -> int:
    """max_tokens clamped to the context left (request_prep.resolve_max_tokens; < 1 is a 400)."""
    try:
        return resolve_max_tokens(requested, default, prompt_len, state.max_model_len, param)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param) from None
