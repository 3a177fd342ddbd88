"""POST /invocations (SageMaker): dispatch on the body's shape to chat, completions, embeddings,
classification, score or rerank (API workers).

As vLLM's, the route answers whatever the body is: `messages` -> chat (embeddings on a pooling
model), `prompt` -> completions, `query` + `documents` -> rerank, `text_1`/`text_2` (or
`queries`, `data_1`/`data_2`) -> score, `input` -> embeddings (classification on a classifier).
The chosen route's handler runs in-process on the same body, so its answer and errors are the
route's own; SageMaker's `/ping` is the existing health route.
"""

from __future__ import annotations

import logging
from typing import Any

from fornax.api.routes import chat, completions, embeddings, scoring
from fornax.api.routes.pooling_common import check_route_runner, is_pooling
from fornax.api.routes.subrequest import Handler, subrequest
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response

logger = logging.getLogger(__name__)

_SHAPES = ("the body must be a JSON object with `messages` (chat), `prompt` (completions), "
           "`input` (embeddings or classification), `query` and `documents` (rerank) or "
           "`text_1` and `text_2` (score)")


def _is_classifier(req: Request) -> bool:
    info = req.state.engine_info.pooling
    return info is not None and "classify" in info.tasks and "embed" not in info.tasks


def route_for(req: Request, body: dict[str, Any]) -> tuple[str, Handler]:
    """(path, handler) of the route this body is meant for."""
    pooling = is_pooling(req.state)
    if "messages" in body:
        if pooling:
            return ("/classify", scoring.classify) if _is_classifier(req) else \
                ("/v1/embeddings", embeddings.embeddings)
        return "/v1/chat/completions", chat.chat_completions
    if "prompt" in body:
        return "/v1/completions", completions.completions
    if "query" in body and "documents" in body:
        return "/rerank", scoring.rerank
    if any(k in body for k in ("text_1", "queries", "data_1")):
        return "/score", scoring.score
    if "input" in body:
        if pooling and _is_classifier(req):
            return "/classify", scoring.classify
        return "/v1/embeddings", embeddings.embeddings
    raise APIError(400, _SHAPES)


async def invocations(req: Request) -> Response:
    raw = await req.body()
    body = await req.json_value()  # size and depth limits, as every JSON route
    if not isinstance(body, dict):
        raise APIError(400, _SHAPES)
    path, handler = route_for(req, body)
    inner = subrequest(req, path, body)
    inner._body = raw  # the very bytes the client sent
    check_route_runner(inner)  # chat or completions on a pooling model: 501
    logger.debug("/invocations -> %s", path)
    return await handler(inner)
