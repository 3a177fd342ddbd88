"""`use_beam_search` over HTTP: drives the engine's BeamSearchState step by step (API workers)."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from fornax.api.generation.generate import new_request_id, request_sampling_params
from fornax.api.protocol.openai import _SamplingFields
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request
from fornax.api.server.state import AppState
from fornax.runtime.engine.messages import EngineCoreRequest
from fornax.runtime.errors import RequestError
from fornax.runtime.limits import MAX_CHOICES_PER_REQUEST
from fornax.runtime.sampling.beam_search import Beam, BeamSearchParams, BeamSearchState
from fornax.runtime.sampling.params import SamplingParams


@dataclass
class BeamResult:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float


def start_beam(http: Request, req: _SamplingFields, id_prefix: str, max_tokens: int,
               num_prompts: int = 1, *, watch: bool = True) -> str:
    """Check a beam-search request, then (unless not `watch`) abort it when the client goes
    away; its public id."""
    check_beam_request(http.state, req, max_tokens, num_prompts)
    if watch:
        http.watch_disconnect()
    return new_request_id(id_prefix, req.request_id or http.request_id)[0]


def check_beam_request(state: AppState, req: _SamplingFields, max_tokens: int,
                       num_prompts: int = 1) -> None:
    """A beam-search request passes the same one validation layer as any other (its fields
    are bounded even where beam search does not use them), then beam search's own rules."""
    if req.stream:
        raise APIError(400, "beam search results cannot be streamed", "use_beam_search")
    if req.temperature not in (None, 0, 0.0):
        raise APIError(400, "beam search is deterministic: temperature must be 0", "temperature")
    params = request_sampling_params(state, req, max_tokens=max_tokens, logprobs=None,
                                     extra=None)
    width = max(params.n, params.best_of or 1)
    if num_prompts * width > MAX_CHOICES_PER_REQUEST:
        raise APIError(400, f"{num_prompts} prompt(s) x {width} beams is more than the "
                       f"{MAX_CHOICES_PER_REQUEST} sequences one request may start", "n")


async def beam_search(state: AppState, prompt_ids: list[int], req: _SamplingFields,
                      max_tokens: int) -> list[BeamResult]:
    """The best `n` of `best_of` (default n) beams for one prompt, best first (HF's
    length-penalised score). The width is under the same cap as n and best_of."""
    n = 1 if req.n is None else req.n
    width = n if req.best_of is None else req.best_of  # vLLM's: best_of beams, the n best kept
    if width < n:
        raise APIError(400, f"best_of ({width}) must not be smaller than n ({n})", "best_of")
    lp = 1.0 if req.length_penalty is None else req.length_penalty
    if not math.isfinite(lp) or abs(lp) > 100.0:
        raise APIError(400, f"length_penalty must be a finite number in [-100, 100], got {lp}",
                       "length_penalty")
    try:
        params = BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                                  ignore_eos=req.ignore_eos, length_penalty=lp,
                                  max_width=state.settings.input_limits.max_n)
    except RequestError as exc:
        param = "best_of" if exc.param == "n" and req.best_of is not None else exc.param
        raise APIError(400, str(exc), param) from None
    search = BeamSearchState(params, frozenset(state.engine_info.eos_token_ids))
    step = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False,
                          logprobs=min(2 * width, state.engine_info.max_logprobs))
    base = f"beam-{uuid.uuid4().hex}"
    num_steps = 0
    while not search.done:
        requests = [EngineCoreRequest(f"{base}-{num_steps}-{b}", prompt_ids + beam.tokens, step,
                                      time.monotonic(), req.priority, req.cache_salt)
                    for b, beam in enumerate(search.running)]
        search.advance(await _one_step(state, requests))
        num_steps += 1
    return [_result(state, beam) for beam in search.best()[:n]]


async def _one_step(state: AppState, requests: list[EngineCoreRequest]
                    ) -> list[list[tuple[int, float]]]:
    """Each running beam's (token, logprob) alternatives for its next token."""
    index = {r.request_id: i for i, r in enumerate(requests)}
    candidates: list[list[tuple[int, float]]] = [[] for _ in requests]
    unfinished = set(index)
    group = await state.engine.add(requests)
    try:
        while unfinished:
            for out in await group.next():
                if out.new_logprobs:
                    lp = out.new_logprobs[0]
                    alts = dict(zip(lp.token_ids, lp.logprobs))
                    candidates[index[out.request_id]] = list(alts.items())
                if out.finish_reason is not None:
                    unfinished.discard(out.request_id)
    finally:
        if unfinished:
            await state.engine.abort(list(unfinished))
    return candidates


def _result(state: AppState, beam: Beam) -> BeamResult:
    return BeamResult(state.tokenizer.decode(beam.tokens), list(beam.tokens), beam.finish_reason,
                      beam.cum_logprob)
