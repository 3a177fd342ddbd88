"""POST /tokenize and /detokenize: prompts or chat messages <-> token ids (API workers)."""

from __future__ import annotations

from fornax.api.protocol.openai import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from fornax.api.routes.chat import render_prompt
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, json_response
from fornax.api.server.offload import prepare


async def tokenize(req: Request) -> Response:
    state = req.state
    body = await req.json(TokenizeRequest)
    state.resolve_model(body.model)
    if body.messages is not None:
        add_special = bool(body.add_special_tokens)  # the template places special tokens
        _, ids = await prepare(
            req, render_prompt, state, body.messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, tools=body.tools,
            documents=None, chat_template=body.chat_template,
            template_kwargs=body.chat_template_kwargs, add_special_tokens=add_special)
    elif body.prompt is not None:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await prepare(req, state.tokenizer.encode, body.prompt,
                            add_special_tokens=add_special)
    else:
        raise APIError(400, "either prompt or messages is required", "prompt")
    strs = None
    if body.return_token_strs:
        strs = await prepare(req, _token_strs, state.tokenizer, ids)
    return json_response(TokenizeResponse(len(ids), state.max_model_len, ids, strs))


def _token_strs(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.id_to_token(t) or "" for t in ids]


async def detokenize(req: Request) -> Response:
    state = req.state
    body = await req.json(DetokenizeRequest)
    state.resolve_model(body.model)
    vocab = state.engine_info.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of vocabulary (size {vocab})", "tokens")
    text = await prepare(req, state.tokenizer.decode, body.tokens, skip_special_tokens=False)
    return json_response(DetokenizeResponse(text))
