"""POST /v1/chat/completions/render and /v1/completions/render: a request's prompt as the engine
would get it (token ids, text, sampling parameters), without generating (API workers).

vLLM's shapes: chat answers one GenerateRequest, completions a list of them (one per prompt).
The prompt goes through the very code the generation routes use (template, tokenizer,
truncation, max_tokens, sampling defaults and checks), so a request that would be refused there
is refused here with the same 400.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from fornax.api.generation.generate import new_request_id, request_sampling_params
from fornax.api.protocol.openai import ChatCompletionRequest, CompletionRequest
from fornax.api.protocol.render import GenerateRequest
from fornax.api.routes.chat import prepare_chat
from fornax.api.routes.completions import prepare_completion
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, json_response
from fornax.runtime.sampling.params import SamplingParams

_Body = TypeVar("_Body", ChatCompletionRequest, CompletionRequest)


def _rendered(req: Request, prefix: str, user_id: str | None, ids: list[int], text: str | None,
              params: SamplingParams, body: ChatCompletionRequest | CompletionRequest
              ) -> GenerateRequest:
    public_id, _ = new_request_id(prefix, user_id or req.request_id)
    return GenerateRequest(
        public_id, ids, msgspec.to_builtins(params, str_keys=True), model=body.model,
        stream=bool(body.stream), stream_options=body.stream_options if body.stream else None,
        cache_salt=body.cache_salt, priority=body.priority, prompt=text)


def _no_beam(body: _Body) -> _Body:
    if body.use_beam_search:  # as vLLM: beam search runs many engine requests, not one
        raise APIError(400, "beam search is not supported by the render endpoint",
                       "use_beam_search")
    return body


async def render_chat(req: Request) -> Response:
    body = _no_beam(await req.json(ChatCompletionRequest))
    _, plan, text, ids, max_tokens = await prepare_chat(req, body)
    params = request_sampling_params(
        req.state, body, max_tokens=max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        extra=plan.sampling_extra(), logprobs_param="top_logprobs")
    return json_response(_rendered(req, "chatcmpl", body.request_id, ids, text, params, body))


async def render_completion(req: Request) -> Response:
    body = _no_beam(await req.json(CompletionRequest))
    _, prompts, max_tokens, extra, _ = await prepare_completion(req, body)
    params = request_sampling_params(req.state, body, max_tokens=max_tokens,
                                     logprobs=body.logprobs, extra=extra)
    state = req.state
    return json_response([
        _rendered(req, "cmpl", body.request_id, p.token_ids,
                  p.text if p.text is not None else
                  state.tokenizer.decode(p.token_ids, skip_special_tokens=False), params, body)
        for p in prompts])
