"""The request front end shared by the API workers and the offline `LLM`: generation-config
defaults, prompt checks and truncation, max_tokens, decoding-settings validation, and the engine
requests of the n / best_of candidates with their seeds (torch-free, any process)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fornax.runtime.engine.messages import EngineCoreRequest
from fornax.runtime.errors import RequestError
from fornax.runtime.limits import DEFAULT_LIMITS, INT64_MAX, InputLimits
from fornax.runtime.sampling.params import SamplingParams

if TYPE_CHECKING:  # the engine core imports this module; it never tokenizes (no tokenizers/jinja2)
    from fornax.runtime.text.tokenizer import TokenizerFront

# generation_config.json keys that become default sampling values (`--generation-config auto`)
_GEN_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "min_p": "min_p", "max_new_tokens": "max_tokens"}


def generation_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """vLLM's rule: the model's generation_config.json values as SamplingParams defaults
    (temperature dropped when the model says do_sample: false)."""
    defaults = {ours: generation_config[theirs] for theirs, ours in _GEN_CONFIG_KEYS.items()
                if theirs in generation_config}
    if generation_config.get("do_sample") is False:
        defaults.pop("temperature", None)
    return defaults


def bad_words_to_token_ids(words: list[str], tokenizer: TokenizerFront) -> list[list[int]]:
    """Each bad word as token ids, both as written and with a leading space (as it appears
    mid-sentence), skipping the spaced form when it tokenizes to the same first token."""
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            raise RequestError(f"bad word {word!r} tokenizes to nothing", "bad_words")
        out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced != plain and spaced[0] != plain[0]:
            out.append(spaced)
    return out


def prepare_sampling_params(params: SamplingParams, tokenizer: TokenizerFront, vocab_size: int,
                            max_logprobs: int | None = None,
                            limits: InputLimits = DEFAULT_LIMITS) -> SamplingParams:
    """The one edge check of a request's decoding settings (API worker or `LLM`): every rule of
    `SamplingParams.validate` with the model's vocabulary, then bad words -> token ids (checked
    against the vocabulary too). The engine core trusts what comes out."""
    params.validate(max_logprobs, vocab_size, limits)
    if params.bad_words and params.bad_words_token_ids is None:
        ids = bad_words_to_token_ids(params.bad_words, tokenizer)
        for word in ids:
            bad = next((t for t in word if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise RequestError(f"bad_words has token id {bad} outside the vocabulary "
                                   f"(size {vocab_size})", "bad_words")
        params = replace(params, bad_words_token_ids=ids)
    return params


def truncate_prompt(token_ids: list[int], truncate_prompt_tokens: int | None,
                    max_model_len: int, side: str | None = None) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last k prompt tokens (-1: the context length),
    or the first k with truncation_side "right"."""
    if truncate_prompt_tokens is None:
        return token_ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    if keep < 1 or keep > max_model_len:
        raise RequestError(f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}], got "
                           f"{truncate_prompt_tokens}", "truncate_prompt_tokens")
    if len(token_ids) <= keep:
        return token_ids
    return token_ids[:keep] if side == "right" else token_ids[-keep:]


def check_prompt_ids(prompt: list[int], vocab_size: int, field: str,
                     noun: str = "prompt") -> None:
    """A request's token ids: at least one, each inside the vocabulary (else a 400)."""
    if not prompt:
        raise RequestError(f"the {noun} is empty (it has no tokens)", field)
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        bad = next(t for t in prompt if t < 0 or t >= vocab_size)
        raise RequestError(f"token id {bad} is out of vocabulary (size {vocab_size})", field)


def check_prompt(token_ids: list[int], max_model_len: int, vocab_size: int,
                 param: str = "prompt") -> None:
    """The one prompt check of a generation: its ids, and room left for output."""
    check_prompt_ids(token_ids, vocab_size, param)
    if len(token_ids) >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {len(token_ids)} tokens, leaving no room for output. Please shorten the prompt.",
            param)


def resolve_max_tokens(requested: int | None, default: int | None, prompt_len: int,
                       max_model_len: int, param: str = "max_tokens") -> int:
    """The one owner of max_tokens: the requested value (else the default, else the context
    left), clamped to the context left after the prompt (not an error); < 1 is refused."""
    room = max_model_len - prompt_len
    value = requested if requested is not None else default
    if value is None:
        return room
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"{param} must be an integer >= 1, got {value!r}", param)
    return min(value, room)


def child_seed(seed: int | None, j: int) -> int | None:
    """Candidate j's seed: seed + j, kept inside int64."""
    if seed is None:
        return None
    child = seed + j
    return child if child <= INT64_MAX else child - 2 ** 64


def child_requests(request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                   max_model_len: int, *, arrival_time: float = 0.0, priority: int = 0,
                   cache_salt: str | None = None) -> list[EngineCoreRequest]:
    """The engine requests of one prompt: one, or one per candidate (n, or best_of when larger;
    ids `request_id-j`, seeds seed + j, ranked candidates report their logprob), each with
    max_tokens resolved against this prompt's room. The engine core trusts what comes out."""
    count = max(params.n, params.best_of or 1)
    max_tokens = resolve_max_tokens(params.max_tokens, None, len(prompt_token_ids), max_model_len)
    if count == 1:
        if max_tokens != params.max_tokens:
            params = params.clone(max_tokens=max_tokens)
        return [EngineCoreRequest(request_id, prompt_token_ids, params, arrival_time, priority,
                                  cache_salt)]
    ranked = count > params.n  # best_of: candidates are ranked by cumulative logprob
    logprobs = 0 if ranked and params.logprobs is None else params.logprobs
    return [EngineCoreRequest(
        f"{request_id}-{j}", prompt_token_ids,
        params.clone(n=1, best_of=None, seed=child_seed(params.seed, j), logprobs=logprobs,
                     max_tokens=max_tokens),
        arrival_time, priority, cache_salt, parent_id=request_id) for j in range(count)]
