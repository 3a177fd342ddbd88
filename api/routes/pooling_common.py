"""Shared by the pooling routes: runner gating (501), inputs, engine round trip (API workers).

Torch-free: pooled vectors arrive as float32 bytes and leave as JSON floats or base64.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

from fornax.api.generation.generate import input_items, is_token_ids
from fornax.api.protocol.pooling import PoolingUsage
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request
from fornax.api.server.state import AppState
from fornax.runtime.engine.messages import (
    EngineCoreRequest,
    PoolingModelInfo,
    PoolingOutput,
    PoolingParams,
)
from fornax.runtime.errors import RequestError
from fornax.runtime.limits import MAX_POOLING_INPUTS
from fornax.runtime.pooling.io import PoolingTokenizer, output_values, resolve_truncation
from fornax.runtime.sampling.params import SamplingParams

MAX_INPUTS = MAX_POOLING_INPUTS
_NO_SAMPLING = SamplingParams(max_tokens=1)
_INPUT_SHAPES = ("must be a string, a list of strings, a list of token ids or a list of token-id "
                 "lists")
# Routes that need a generation model; a pooling model answers them with 501.
GENERATION_PATHS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
    "/v1/chat/completions/render", "/v1/completions/render", "/v1/audio/transcriptions",
    "/v1/audio/translations"})


def is_pooling(state: AppState) -> bool:
    return getattr(state.engine_info, "runner", "generate") == "pooling"


def check_route_runner(req: Request) -> None:
    """501 for a generation route on a pooling model (called by the app before dispatch)."""
    state = req.state
    if state is not None and req.path in GENERATION_PATHS and "audio" not in req.path \
            and getattr(state.engine_info, "runner", "generate") == "transcription":
        raise APIError(501, f"{req.path} needs a text-generation model, but "
                       f"{state.model_name} is a speech-to-text model; it serves "
                       "/v1/audio/transcriptions, /v1/audio/translations and WS /v1/realtime")
    if state is not None and req.path in GENERATION_PATHS and is_pooling(state):
        info = state.engine_info.pooling
        arch = info.architecture if info else "this model"
        raise APIError(501, f"{req.path} needs a text-generation model, but this server runs a "
                       f"pooling model ({arch}); it serves /v1/embeddings, /pooling, /classify, "
                       "/score and /rerank as the model allows")


def require_task(state: AppState, task: str, route: str) -> PoolingModelInfo:
    """The pooling model's info, or 501 when the model cannot serve `task` on `route`."""
    info = state.engine_info.pooling if is_pooling(state) else None
    if info is None:
        raise APIError(501, f"{route} needs a pooling model (an embedding model, classifier or "
                       f"cross-encoder), but this server runs the generation model "
                       f"{state.engine_info.architecture}; serve a pooling model, or this one "
                       "with --runner pooling")
    if task not in info.tasks:
        what = {"embed": "embeddings", "classify": "classification",
                "score": "pair scores"}.get(task, task)
        if task == "score" and info.head == "classify":
            detail = (f"it is a classifier with {len(info.labels)} labels; scoring needs a "
                      "cross-encoder with one output label or an embedding model")
        else:
            detail = f"it serves {', '.join(t for t in info.tasks if t != 'encode')}"
        raise APIError(501, f"{route}: this model ({info.architecture}) does not produce {what}; "
                       f"{detail}")
    return info


def pooling_tokenizer(state: AppState, info: PoolingModelInfo,
                      side: str | None = None) -> PoolingTokenizer:
    return PoolingTokenizer(state.tokenizer, info.max_model_len, side or info.truncation_side)


def truncation_limit(value: int | None, info: PoolingModelInfo) -> int | None:
    try:
        return resolve_truncation(value, info.max_model_len)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param) from None


def parse_input(state: AppState, info: PoolingModelInfo, value: Any, limit: int | None,
                add_special_tokens: bool = True, param: str = "input",
                prefix: str = "", side: str | None = None) -> list[list[int]]:
    """Every accepted `input` shape -> token ids (texts tokenized, each within the context)."""
    items = input_items(value, param, f"{param} {_INPUT_SHAPES}",
                        f"{param} must not be an empty list")
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param)
    tok = pooling_tokenizer(state, info, side)
    try:
        if all(isinstance(t, str) for t in items):
            for i, text in enumerate(items):
                if not text:
                    raise APIError(400, f"{param}[{i}] is an empty string" if len(items) > 1
                                   else f"{param} is an empty string", param)
            return tok.texts([prefix + t for t in items], limit, param, add_special_tokens)
        if all(is_token_ids(t) for t in items):
            return tok.token_ids(items, limit, param)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param or param) from None
    raise APIError(400, f"{param} {_INPUT_SHAPES}", param)


def chat_input(state: AppState, info: PoolingModelInfo, body: Any,
               limit: int | None) -> list[list[int]]:
    """`messages` instead of `input`: the chat template's rendering, tokenized once."""
    from fornax.api.routes.chat import render_prompt

    _, ids = render_prompt(
        state, body.messages, add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message, tools=None, documents=None,
        chat_template=body.chat_template, template_kwargs=body.chat_template_kwargs,
        add_special_tokens=bool(body.add_special_tokens))
    tok = pooling_tokenizer(state, info, getattr(body, "truncation_side", None))
    try:
        return tok.token_ids([ids], limit, "messages")
    except RequestError as exc:
        raise APIError(400, str(exc), "messages") from None


def request_inputs(state: AppState, info: PoolingModelInfo, body: Any) -> list[list[int]]:
    """A pooling request's token ids: from `input`, or from `messages` (not both), each within
    truncate_prompt_tokens and the context."""
    limit = truncation_limit(body.truncate_prompt_tokens, info)
    if body.messages is not None:
        if body.input is not None:
            raise APIError(400, "give either input or messages, not both", "messages")
        return chat_input(state, info, body, limit)
    add_special = True if body.add_special_tokens is None else body.add_special_tokens
    return parse_input(state, info, body.input, limit, add_special,
                       side=getattr(body, "truncation_side", None))


def request_ids(prefix: str, user_id: str | None) -> tuple[str, str]:
    unique = uuid.uuid4().hex
    public = f"{prefix}-{user_id}" if user_id else f"{prefix}-{unique}"
    return public, f"{public}-{unique[:8]}"


async def run_pooling(req: Request, engine_id: str, token_lists: list[list[int]],
                      params: PoolingParams, type_lists: list[list[int]] | None = None,
                      priority: int = 0) -> list[PoolingOutput]:
    """Send one engine request per input and wait for all; the outputs in input order."""
    state = req.state
    arrival = time.monotonic()
    requests = [EngineCoreRequest(f"{engine_id}-{i}", ids, _NO_SAMPLING, arrival, priority,
                                  pooling_params=params,
                                  token_type_ids=type_lists[i] if type_lists else None)
                for i, ids in enumerate(token_lists)]
    index = {r.request_id: i for i, r in enumerate(requests)}
    results: list[PoolingOutput | None] = [None] * len(requests)
    missing = len(requests)
    req.watch_disconnect()
    group = await state.engine.add(requests)
    try:
        while missing:
            for out in await group.next():
                if out.pooled is None:
                    raise APIError(503, f"the engine ended request {out.request_id} without a "
                                   f"result ({out.finish_reason or out.error})")
                i = index[out.request_id]
                if results[i] is None:
                    results[i] = out.pooled
                    missing -= 1
    finally:
        await state.engine.release(group)
    metrics = state.metrics
    metrics.prompt_tokens.inc(sum(len(t) for t in token_lists))
    metrics.request_finished("stop")
    metrics.e2e.observe(time.monotonic() - arrival)
    return results  # type: ignore[return-value]


def usage(token_lists: list[list[int]]) -> PoolingUsage:
    n = sum(len(t) for t in token_lists)
    return PoolingUsage(prompt_tokens=n, total_tokens=n)


def encode_vector(out: PoolingOutput, encoding_format: str) -> list[float] | str:
    """float: JSON numbers; base64: the float32 little-endian bytes, as OpenAI sends them."""
    if encoding_format == "base64":
        return base64.b64encode(out.data).decode("ascii")
    return output_values(out)


def pooling_probe(state: AppState) -> EngineCoreRequest:
    """`/health?deep=1` on a pooling model: one tiny pooling forward."""
    info = state.engine_info.pooling
    task = "embed" if info is None or "embed" in info.tasks else "classify"
    ids = state.tokenizer.encode("ping") or [0]
    return EngineCoreRequest(f"health-{uuid.uuid4().hex}", ids, _NO_SAMPLING,
                             pooling_params=PoolingParams(task))
