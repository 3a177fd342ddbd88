"""POST /v1/embeddings (OpenAI), /pooling (vLLM) and /v2/embed (Cohere) (API workers)."""

from __future__ import annotations

import base64
import logging
import time
from array import array
from typing import Any

from fornax.api.protocol.pooling import (
    ApiVersion,
    BilledUnits,
    CohereEmbedRequest,
    CohereEmbedResponse,
    CohereMeta,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
)
from fornax.api.routes.pooling_common import (
    encode_vector,
    pooling_tokenizer,
    request_ids,
    request_inputs,
    require_task,
    run_pooling,
    usage,
)
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, json_response
from fornax.api.server.offload import prepare
from fornax.runtime.engine.messages import PoolingModelInfo, PoolingParams
from fornax.runtime.errors import RequestError
from fornax.runtime.pooling.io import output_values

logger = logging.getLogger(__name__)

_COHERE_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
# Cohere input types -> sentence-transformers prompt names to try, in order
_COHERE_PROMPTS = {"search_query": ("search_query", "query"),
                   "search_document": ("search_document", "document", "passage"),
                   "classification": ("classification",), "clustering": ("clustering",)}


def check_dimensions(info: PoolingModelInfo, dims: int | None, param: str = "dimensions") -> None:
    """Matryoshka truncation only where the model was trained for it (else 400, as vLLM)."""
    if dims is None:
        return
    if not info.is_matryoshka:
        raise APIError(400, f"this model does not support Matryoshka representation: {param} "
                       "cannot change its output size", param)
    if info.matryoshka_dimensions and dims not in info.matryoshka_dimensions:
        raise APIError(400, f"{param} must be one of {info.matryoshka_dimensions}, got {dims}",
                       param)
    if not 1 <= dims <= info.hidden_size:
        raise APIError(400, f"{param} must be between 1 and {info.hidden_size}, got {dims}",
                       param)


def _normalize(body: EmbeddingRequest) -> bool | None:
    """normalize, or vLLM's newer use_activation when normalize is not given."""
    return body.normalize if body.normalize is not None else body.use_activation


async def embeddings(req: Request) -> Response:
    state = req.state
    body = await req.json(EmbeddingRequest)
    model = state.resolve_model(body.model)
    info = require_task(state, "embed", "/v1/embeddings")
    check_dimensions(info, body.dimensions)
    token_lists = await prepare(req, request_inputs, state, info, body)
    public_id, engine_id = request_ids("embd", body.request_id or req.request_id)
    params = PoolingParams("embed", dimensions=body.dimensions, normalize=_normalize(body))
    outs = await run_pooling(req, engine_id, token_lists, params, priority=body.priority)
    data = [EmbeddingData(i, encode_vector(o, body.encoding_format)) for i, o in enumerate(outs)]
    if state.settings.log_requests:
        logger.info("embedding request %s: %d input(s), %d tokens", public_id, len(token_lists),
                    sum(len(t) for t in token_lists))
    return json_response(EmbeddingResponse(public_id, int(time.time()), model, data,
                                           usage(token_lists)))


async def pooling(req: Request) -> Response:
    """The model's raw pooled output: its embedding, or its class probabilities."""
    state = req.state
    body = await req.json(PoolingRequest)
    model = state.resolve_model(body.model)
    info = require_task(state, "encode", "/pooling")
    task = body.task or "encode"
    if task not in ("encode", "embed", "classify"):
        raise APIError(400, f"task must be 'embed', 'classify' or 'encode', got {task!r}", "task")
    if task != "encode":
        require_task(state, task, "/pooling")
    check_dimensions(info, body.dimensions)
    token_lists = await prepare(req, request_inputs, state, info, body)
    public_id, engine_id = request_ids("pool", body.request_id or req.request_id)
    params = PoolingParams(task, dimensions=body.dimensions, normalize=_normalize(body))
    outs = await run_pooling(req, engine_id, token_lists, params, priority=body.priority)
    data = [PoolingData(i, encode_vector(o, body.encoding_format)) for i, o in enumerate(outs)]
    return json_response(PoolingResponse(public_id, int(time.time()), model, data,
                                         usage(token_lists)))


# ---- Cohere /v2/embed ------------------------------------------------------------------------


def _cohere_texts(body: CohereEmbedRequest) -> list[str]:
    if body.images is not None:
        raise APIError(400, "images are not supported: this is a text embedding model", "images")
    if body.texts is not None:
        texts = body.texts
        param = "texts"
    elif body.inputs is not None:
        texts, param = [], "inputs"
        for i, item in enumerate(body.inputs if isinstance(body.inputs, list) else [None]):
            content = item.get("content") if isinstance(item, dict) else None
            if not isinstance(content, list) or not all(
                    isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"inputs[{i}] must hold text content parts only", "inputs")
            texts.append("".join(str(p.get("text", "")) for p in content))
    else:
        raise APIError(400, "texts is required", "texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise APIError(400, f"{param} must be a non-empty list of strings", param)
    if any(not t for t in texts):
        raise APIError(400, f"{param} must not contain empty strings", param)
    return texts


def _quantize(values: list[float], kind: str) -> list[Any] | str:
    """Cohere's compressed types: int8/uint8 scale a unit vector by 127; (u)binary packs sign bits
    8 to a byte (binary as signed bytes: ubinary - 128)."""
    if kind == "float":
        return values
    if kind == "base64":
        return base64.b64encode(array("f", values).tobytes()).decode("ascii")
    if kind in ("int8", "uint8"):
        shift = 0 if kind == "int8" else 128
        return [max(-128, min(127, round(v * 127))) + shift for v in values]
    bits = [1 if v > 0 else 0 for v in values] + [0] * (-len(values) % 8)
    packed = [int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8)]
    return packed if kind == "ubinary" else [b - 128 for b in packed]


async def cohere_embed(req: Request) -> Response:
    state = req.state
    body = await req.json(CohereEmbedRequest)
    state.resolve_model(body.model)
    info = require_task(state, "embed", "/v2/embed")
    texts = _cohere_texts(body)
    types = body.embedding_types or ["float"]
    bad = [t for t in types if t not in _COHERE_TYPES]
    if bad:
        raise APIError(400, f"embedding_types: unknown type {bad[0]!r} (one of "
                       f"{', '.join(_COHERE_TYPES)})", "embedding_types")
    check_dimensions(info, body.output_dimension, "output_dimension")
    prefix = ""
    for name in _COHERE_PROMPTS.get(body.input_type or "", ()):
        if name in info.prompts:
            prefix = info.prompts[name]
            break
    side = {"START": "left", "END": "right"}.get(body.truncate)
    limit = info.max_model_len if side else None
    tok = pooling_tokenizer(state, info, side)
    try:
        token_lists = tok.texts([prefix + t for t in texts], limit, "texts")
    except RequestError as exc:
        raise APIError(400, str(exc), "texts") from None
    public_id, engine_id = request_ids("embd", req.request_id)
    params = PoolingParams("embed", dimensions=body.output_dimension)
    outs = await run_pooling(req, engine_id, token_lists, params, priority=body.priority)
    vectors = [output_values(o) for o in outs]
    embeddings = {kind: [_quantize(v, kind) for v in vectors] for kind in dict.fromkeys(types)}
    meta = CohereMeta(ApiVersion("2"),
                      BilledUnits(input_tokens=sum(len(t) for t in token_lists)))
    return json_response(CohereEmbedResponse(public_id, embeddings, texts, meta))
