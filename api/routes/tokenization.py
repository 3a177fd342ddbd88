"""POST /tokenize and /detokenize (and /v1/...): prompts or chat messages <-> token ids; GET
/tokenizer_info: the tokenizer's config (API workers)."""

from __future__ import annotations

from typing import Any

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


_FILE_KEYS = ("vocab_file", "merges_file", "tokenizer_file")  # paths on the server: left out


def _plain(value: Any) -> Any:
    """Special tokens ({"content": ...} objects) as their text, as vLLM shows them."""
    if isinstance(value, dict):
        if isinstance(value.get("content"), str):
            return value["content"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


async def tokenizer_info(req: Request) -> Response:
    """vLLM's GET /tokenizer_info (only with --enable-tokenizer-info-endpoint): the tokenizer's
    tokenizer_config.json without file paths, special tokens as text, its class (the fast
    variant, the one that reads tokenizer.json) and the chat template in force."""
    tok = req.state.tokenizer
    info = {k: _plain(v) for k, v in tok.config.items() if k not in _FILE_KEYS}
    cls = str(info.get("tokenizer_class") or "PreTrainedTokenizer")
    info["tokenizer_class"] = cls if cls.endswith("Fast") else cls + "Fast"
    if tok.chat_template:
        info["chat_template"] = tok.chat_template
    return json_response(info)
