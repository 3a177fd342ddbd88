"""Front-end preparation of a request before it reaches the engine (torch-free, any process)."""

from __future__ import annotations

from dataclasses import replace

from fornax.runtime.errors import RequestError
from fornax.runtime.limits import DEFAULT_LIMITS, InputLimits
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.text.tokenizer import TokenizerFront


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
                    max_model_len: int) -> list[int]:
    """Keep the last k prompt tokens (-1: as many as the context allows), as vLLM does."""
    if truncate_prompt_tokens is None:
        return token_ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return token_ids[-keep:] if len(token_ids) > keep else token_ids
