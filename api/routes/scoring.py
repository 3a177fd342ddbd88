"""POST /classify, /score, /v1/score, /rerank, /v1/rerank (Jina), /v2/rerank (Cohere) (API workers).

A cross-encoder scores each (query, document) pair with its head in one forward; an embedding model
scores by the cosine similarity of the two embeddings (as vLLM does).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fornax.api.protocol.pooling import (
    ApiVersion,
    BilledUnits,
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    CohereMeta,
    PoolingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from fornax.api.routes.pooling_common import (
    MAX_INPUTS,
    pooling_tokenizer,
    request_ids,
    request_inputs,
    require_task,
    run_pooling,
    truncation_limit,
    usage,
)
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, json_response
from fornax.api.server.offload import prepare
from fornax.api.server.state import AppState
from fornax.runtime.engine.messages import PoolingModelInfo, PoolingParams
from fornax.runtime.errors import RequestError
from fornax.runtime.pooling.io import cosine, output_values, pair_indices

logger = logging.getLogger(__name__)


def _activation(body: Any) -> bool:
    for value in (getattr(body, "use_activation", None), getattr(body, "activation", None)):
        if value is not None:
            return bool(value)
    return True


async def classify(req: Request) -> Response:
    state = req.state
    body = await req.json(ClassificationRequest)
    model = state.resolve_model(body.model)
    info = require_task(state, "classify", "/classify")
    token_lists = await prepare(req, request_inputs, state, info, body)
    public_id, engine_id = request_ids("classify", body.request_id or req.request_id)
    params = PoolingParams("classify", activation=_activation(body))
    outs = await run_pooling(req, engine_id, token_lists, params, priority=body.priority)
    data = []
    for i, out in enumerate(outs):
        probs = output_values(out)
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append(ClassificationData(i, info.labels[best], probs, len(probs)))
    return json_response(ClassificationResponse(public_id, int(time.time()), model, data,
                                                usage(token_lists)))


def _texts(value: Any, param: str, single_ok: bool = True) -> list[str]:
    if isinstance(value, str) and single_ok:
        values = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        values = value
    else:
        raise APIError(400, f"{param} must be a string or a list of strings", param)
    if not values:
        raise APIError(400, f"{param} must not be an empty list", param)
    if len(values) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} items in {param}", param)
    for i, v in enumerate(values):
        if not v:
            raise APIError(400, f"{param}[{i}] is an empty string", param)
    return values


async def _score_pairs(req: Request, info: PoolingModelInfo, texts_1: list[str],
                       texts_2: list[str], pairs: list[tuple[int, int]], limit: int | None,
                       engine_id: str, priority: int, activation: bool = True,
                       max_second: int | None = None, param_1: str = "text_1",
                       param_2: str = "text_2", side: str | None = None
                       ) -> tuple[list[float], int]:
    """One score per pair, and the number of tokens the model ran over."""
    state: AppState = req.state
    tok = pooling_tokenizer(state, info, side)
    try:
        if info.head == "classify":  # cross-encoder: [CLS] a [SEP] b [SEP] through the head
            encoded = tok.pairs([(texts_1[i], texts_2[j]) for i, j in pairs], limit, param_2,
                                max_second)
        else:
            second_limit = limit
            if max_second is not None:
                specials = tok.tok.num_special_tokens_to_add(False)
                second_limit = min(limit or info.max_model_len, max_second + specials)
            ids_1 = tok.texts(texts_1, limit, param_1)
            ids_2 = tok.texts(texts_2, second_limit, param_2)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param or param_2) from None
    if info.head == "classify":
        params = PoolingParams("score", activation=activation)
        outs = await run_pooling(req, engine_id, [e[0] for e in encoded], params,
                                 type_lists=[e[1] for e in encoded], priority=priority)
        return [output_values(o)[0] for o in outs], sum(len(e[0]) for e in encoded)
    outs = await run_pooling(req, engine_id, ids_1 + ids_2, PoolingParams("embed"),
                             priority=priority)
    vectors = [output_values(o) for o in outs]
    n1 = len(ids_1)
    return ([cosine(vectors[i], vectors[n1 + j]) for i, j in pairs],
            sum(len(t) for t in ids_1 + ids_2))


def _score_inputs(body: ScoreRequest) -> tuple[Any, Any, str, str]:
    for name_1, name_2 in (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"),
                           ("data_1", "data_2")):
        v1, v2 = getattr(body, name_1), getattr(body, name_2)
        if v1 is not None or v2 is not None:
            if v1 is None:
                raise APIError(400, f"{name_1} is required", name_1)
            if v2 is None:
                raise APIError(400, f"{name_2} is required", name_2)
            return v1, v2, name_1, name_2
    raise APIError(400, "text_1 and text_2 are required", "text_1")


async def score(req: Request) -> Response:
    state = req.state
    body = await req.json(ScoreRequest)
    model = state.resolve_model(body.model)
    info = require_task(state, "score", req.path)
    v1, v2, name_1, name_2 = _score_inputs(body)
    texts_1, texts_2 = _texts(v1, name_1), _texts(v2, name_2)
    try:
        pairs = pair_indices(len(texts_1), len(texts_2), name_1, name_2)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param) from None
    limit = truncation_limit(body.truncate_prompt_tokens, info)
    public_id, engine_id = request_ids("score", body.request_id or req.request_id)
    scores, num_tokens = await _score_pairs(req, info, texts_1, texts_2, pairs, limit, engine_id,
                                            body.priority, _activation(body), param_1=name_1,
                                            param_2=name_2, side=body.truncation_side)
    data = [ScoreData(i, s) for i, s in enumerate(scores)]
    return json_response(ScoreResponse(public_id, int(time.time()), model, data,
                                       PoolingUsage(num_tokens, num_tokens)))


def _documents(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "documents must be a non-empty list of strings or {\"text\": ...} "
                       "objects", "documents")
    texts = []
    for i, doc in enumerate(value):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str):
            raise APIError(400, f"documents[{i}] must be a string or an object with a string "
                           "'text'", "documents")
        texts.append(text)
    return _texts(texts, "documents", single_ok=False)


async def rerank(req: Request) -> Response:
    """Jina's and Cohere's shape: results sorted by relevance, `top_n` of them."""
    state = req.state
    body = await req.json(RerankRequest)
    model = state.resolve_model(body.model)
    info = require_task(state, "score", req.path)
    if not isinstance(body.query, str) or not body.query:
        raise APIError(400, "query must be a non-empty string", "query")
    docs = _documents(body.documents)
    if body.top_n is not None and body.top_n < 0:
        raise APIError(400, f"top_n must be a positive integer, got {body.top_n}", "top_n")
    if body.max_tokens_per_doc is not None and body.max_tokens_per_doc < 1:
        raise APIError(400, "max_tokens_per_doc must be a positive integer", "max_tokens_per_doc")
    limit = truncation_limit(body.truncate_prompt_tokens, info)
    public_id, engine_id = request_ids("rerank", body.request_id or req.request_id)
    pairs = [(0, j) for j in range(len(docs))]
    scores, num_tokens = await _score_pairs(req, info, [body.query], docs, pairs, limit,
                                            engine_id, body.priority,
                                            max_second=body.max_tokens_per_doc,
                                            side=body.truncation_side,
                                            param_1="query", param_2="documents")
    order = sorted(range(len(docs)), key=lambda j: scores[j], reverse=True)
    if body.top_n:
        order = order[:body.top_n]
    results = [RerankResult(j, scores[j], RerankDocument(docs[j]) if body.return_documents
                            else None) for j in order]
    meta = None
    if req.path == "/v2/rerank":
        meta = CohereMeta(ApiVersion("2"), BilledUnits(search_units=1))
    return json_response(RerankResponse(public_id, model, RerankUsage(num_tokens, num_tokens),
                                        results, meta))
