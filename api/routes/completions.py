"""POST /v1/completions: prompts (text or token ids, one or many) -> JSON or SSE (API workers)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fornax.api.generation.beam import beam_search, start_beam
from fornax.api.generation.generate import (
    Generation,
    PromptInput,
    Updates,
    begin_generation,
    input_items,
    is_token_ids,
)
from fornax.api.generation.logprobs import CompletionLogprobsBuilder, merge, prompt_logprobs_json
from fornax.api.generation.output import collect, sse_stream
from fornax.api.generation.sampling import check_unsupported, front_max_tokens, front_prompt
from fornax.api.generation.structured import backend_headers, request_constraint
from fornax.api.protocol.openai import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from fornax.api.reasoning import thinking_state
from fornax.api.routes.chat_features import thinking_budget_params
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, StreamingResponse, json_response
from fornax.api.server.offload import prepare
from fornax.api.server.state import AppState
from fornax.runtime.offline.outputs import Logprob

logger = logging.getLogger(__name__)

_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for completions
_PROMPT_SHAPES = ("prompt must be a string, a list of strings, a list of token ids or a list of "
                  "token-id lists")


def parse_prompts(state: AppState, prompt: Any, add_special_tokens: bool) -> list[PromptInput]:
    """Every accepted prompt shape -> token ids (and text, for echo)."""
    items = input_items(prompt, "prompt", _PROMPT_SHAPES)
    max_prompts = state.settings.input_limits.max_prompts
    if len(items) > max_prompts:
        raise APIError(400, f"at most {max_prompts} prompts per request "
                       "(--max-prompts-per-request)", "prompt")
    if all(isinstance(p, str) for p in items):
        ids = state.tokenizer.encode_batch(items, add_special_tokens=add_special_tokens)
        return [PromptInput(i, t) for i, t in zip(ids, items)]
    if all(is_token_ids(p) for p in items):
        return [PromptInput(list(p), None) for p in items]
    raise APIError(400, _PROMPT_SHAPES, "prompt")


async def prepare_completion(req: Request, body: CompletionRequest
                             ) -> tuple[str, list[PromptInput], int, dict[str, Any], Any]:
    """What the engine would get for a completion request, checked: (model name, prompts,
    max_tokens, extra SamplingParams fields, output constraint). Shared with the render route."""
    state = req.state
    model = state.resolve_model(body.model)
    check_unsupported(body, structured=True)
    constraint = request_constraint(body)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by this model", "suffix")
    prompts = await prepare(req, parse_prompts, state, body.prompt, body.add_special_tokens)
    for p in prompts:
        p.token_ids = front_prompt(state, p.token_ids, body.truncate_prompt_tokens, "prompt",
                                   body.truncation_side)
    shortest = min(len(p.token_ids) for p in prompts)  # each prompt's own: request_prep
    max_tokens = front_max_tokens(state, body.max_tokens, shortest, "max_tokens",
                                  _DEFAULT_MAX_TOKENS)
    extra: dict[str, Any] = {}
    if body.echo and body.logprobs is not None and body.prompt_logprobs is None:
        extra["prompt_logprobs"] = body.logprobs  # echoed prompt tokens get their logprobs
    extra.update(_thinking_budget(state, body, prompts))
    if constraint is not None:
        if body.use_beam_search:
            raise APIError(400, "beam search cannot follow an output constraint",
                           "use_beam_search")
        extra["structured_outputs"] = constraint
    return model, prompts, max_tokens, extra, constraint


async def completions(req: Request) -> Response:
    state = req.state
    body = await req.json(CompletionRequest)
    model, prompts, max_tokens, extra, constraint = await prepare_completion(req, body)
    if body.use_beam_search:
        return json_response(await _beam(req, body, model, prompts, max_tokens))
    gen, public_id, created = begin_generation(req, body, "cmpl", prompts, max_tokens=max_tokens,
                                               logprobs=body.logprobs, extra=extra)
    if body.echo:
        for p in prompts:
            if p.text is None:
                p.text = state.tokenizer.decode(p.token_ids, skip_special_tokens=False)
    headers = {"x-request-id": public_id, **backend_headers(constraint)}
    if body.stream:
        chunks = _chunks(gen, body, model, public_id, created, await gen.start())
        return StreamingResponse(sse_stream(chunks, public_id), headers=headers)
    return json_response(await _complete(gen, body, model, public_id, created), headers=headers)


def _thinking_budget(state: AppState, body: CompletionRequest,
                     prompts: list[PromptInput]) -> dict[str, Any]:
    """thinking_token_budget on a raw prompt: where the (first) prompt leaves the thinking,
    read from its last tokens, decides when the budget starts counting."""
    if body.thinking_token_budget in (None, -1):
        return {}
    cls = state.chat_features.reasoning_parser
    tail = state.tokenizer.decode(prompts[0].token_ids[-32:], skip_special_tokens=False) \
        if cls is not None else ""
    reasoning_state = thinking_state(tail, cls.start, cls.end) if cls is not None else "none"
    return thinking_budget_params(body.thinking_token_budget, cls, reasoning_state,
                                  state.tokenizer)


async def _beam(req: Request, body: CompletionRequest, model: str, prompts: list[PromptInput],
                max_tokens: int) -> CompletionResponse:
    """use_beam_search: the n best beams of each prompt (not streamed)."""
    if body.logprobs is not None or body.echo:
        raise APIError(400, "beam search returns no logprobs and no echo", "use_beam_search")
    public_id = start_beam(req, body, "cmpl", max_tokens, len(prompts))
    state = req.state
    choices: list[CompletionChoice] = []
    completion_tokens = 0
    for p in prompts:
        room = state.max_model_len - len(p.token_ids)
        for beam in await beam_search(state, p.token_ids, body, min(max_tokens, room)):
            choices.append(CompletionChoice(len(choices), beam.text, None, beam.finish_reason))
            completion_tokens += len(beam.token_ids)
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return CompletionResponse(public_id, int(time.time()), model, choices,
                              UsageInfo(prompt_tokens, prompt_tokens + completion_tokens,
                                        completion_tokens))


class _Echo:
    """Per choice: the prompt text (and its token strings for logprobs) to put in front."""

    def __init__(self, state: AppState, gen: Generation, body: CompletionRequest) -> None:
        self.state, self.gen, self.body = state, gen, body
        self.as_ids = bool(body.return_tokens_as_token_ids)
        self.builders = [CompletionLogprobsBuilder(body.logprobs or 0, self.as_ids)
                         for _ in range(gen.num_candidates)]

    def prefix(self, index: int) -> tuple[str, CompletionLogprobs | None]:
        prompt_index = index // self.gen.count
        prompt = self.gen.prompts[prompt_index]
        lps = None
        if self.body.logprobs is not None:
            ids = prompt.token_ids if self.body.echo else []
            strs = [f"token_id:{t}" if self.as_ids else
                    self.state.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
            lps = self.builders[index].prompt(ids, strs, self.gen.prompt_logprobs.get(prompt_index))
        return (prompt.text or "") if self.body.echo else "", lps

    def logprobs(self, index: int, entries: list[dict[int, Logprob]] | None
                 ) -> CompletionLogprobs | None:
        if self.body.logprobs is None or entries is None:
            return None
        return self.builders[index].add(entries)


async def _complete(gen: Generation, body: CompletionRequest, model: str, public_id: str,
                    created: int) -> CompletionResponse:
    echo = _Echo(gen.state, gen, body)
    choices = []
    for i, c in enumerate(await collect(gen)):
        prefix, lps = echo.prefix(i)
        more = echo.logprobs(i, c.logprobs)
        if lps is not None and more is not None:
            merge(lps, more)
        choices.append(CompletionChoice(
            i, prefix + c.text, lps, c.finish_reason, c.stop_reason,
            prompt_logprobs_json(gen.prompt_logprobs.get(i // gen.count))
            if body.prompt_logprobs is not None else None,
            gen.prompts[i // gen.count].token_ids if body.return_token_ids else None,
            c.token_ids if body.return_token_ids else None))
    return CompletionResponse(public_id, created, model, gen.pick(choices), gen.usage())


async def _chunks(gen: Generation, body: CompletionRequest, model: str, public_id: str,
                  created: int, updates: Updates) -> AsyncIterator[CompletionChunk]:
    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = include_usage and bool(opts and opts.continuous_usage_stats)
    echo = _Echo(gen.state, gen, body)
    started: set[int] = set()
    ids = bool(body.return_token_ids)
    held: dict[int, list[int]] = {}  # token ids whose text is not sent yet
    try:
        async for batch in updates:
            for u in batch:
                text, lps = "", None
                prompt_ids = None
                if u.index not in started:
                    started.add(u.index)
                    text, lps = echo.prefix(u.index)
                    prompt_ids = gen.prompts[u.index // gen.count].token_ids if ids else None
                pending = held.setdefault(u.index, []) if ids else None
                if pending is not None:
                    pending.extend(u.token_ids)
                text += u.text
                more = echo.logprobs(u.index, u.logprobs)
                if more is not None:
                    if lps is None:
                        lps = more
                    else:
                        merge(lps, more)
                if text or u.finish_reason is not None or (lps and lps.tokens) or prompt_ids:
                    choice = CompletionChoice(u.index, text, lps, u.finish_reason, u.stop_reason,
                                              None, prompt_ids,
                                              list(pending) if pending is not None else None)
                    if pending is not None:
                        pending.clear()
                    yield CompletionChunk(public_id, created, model, [choice],
                                          usage=gen.usage() if continuous else None)
        if include_usage:
            yield CompletionChunk(public_id, created, model, [], usage=gen.usage())
    finally:
        await updates.aclose()  # type: ignore[attr-defined]
