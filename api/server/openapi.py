"""GET /openapi.json: an OpenAPI 3.1 document of every route, generated from the msgspec
protocol structs once per API worker and cached (API workers).

The document describes shapes only: no API key, model path or served model name is in it, so it
is public like /health (vLLM serves it without a key too). Routes for another kind of model
(pooling, speech) are listed as well; on this server they answer 501. The dev routes are listed
only when --enable-dev-endpoints is on, since they do not exist otherwise; likewise
/tokenizer_info with --enable-tokenizer-info-endpoint. --disable-fastapi-docs removes this route
and /docs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Union

import msgspec

from fornax.api.protocol import anthropic as anth
from fornax.api.protocol import audio as aud
from fornax.api.protocol import openai as oai
from fornax.api.protocol import pooling as pool
from fornax.api.protocol.render import GenerateRequest
from fornax.api.protocol.responses import ResponsesRequest
from fornax.api.server.http import Request, Response
from fornax.api.server.settings import ServerSettings
from fornax.audio.formats import RESPONSE_FORMATS

logger = logging.getLogger(__name__)

REF = "#/components/schemas/{name}"
_cache: dict[tuple[bool, bool, bool], bytes] = {}

# ---- hand-written schemas for the bodies that are not one struct -----------------------------

_OBJ: dict[str, Any] = {"type": "object", "additionalProperties": True}
_SCHEMAS: dict[str, dict[str, Any]] = {
    "ResponseObject": {
        "type": "object", "description": "A Responses API response (OpenAI's shape).",
        "required": ["id", "object", "created_at", "status", "output"],
        "properties": {
            "id": {"type": "string", "description": "resp_ + random hex; made by the server"},
            "object": {"const": "response"}, "created_at": {"type": "integer"},
            "status": {"enum": ["queued", "in_progress", "completed", "incomplete", "failed",
                                "cancelled"]},
            "background": {"type": "boolean"}, "store": {"type": "boolean"},
            "model": {"type": "string"}, "output": {"type": "array", "items": _OBJ},
            "usage": {"anyOf": [_OBJ, {"type": "null"}]},
            "error": {"anyOf": [_OBJ, {"type": "null"}]},
            "previous_response_id": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "additionalProperties": True},
    "ResponseDeleted": {
        "type": "object", "required": ["id", "object", "deleted"],
        "properties": {"id": {"type": "string"}, "object": {"const": "response"},
                       "deleted": {"const": True}}},
    "InputItemList": {
        "type": "object", "required": ["object", "data", "has_more"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _OBJ},
                       "first_id": {"type": ["string", "null"]},
                       "last_id": {"type": ["string", "null"]}, "has_more": {"type": "boolean"}}},
    "ChatBatchRequest": {
        "type": "object", "required": ["messages"], "additionalProperties": True,
        "description": "Several chat conversations answered in one call; every other field is "
        "a ChatCompletionRequest field applied to each (no stream, tools or n > 1).",
        "properties": {"model": {"type": "string"}, "messages": {
            "type": "array", "minItems": 1, "description": "one list of messages each",
            "items": {"type": "array", "minItems": 1, "items": _OBJ}}}},
    "AudioForm": {
        "type": "object", "required": ["file"],
        "properties": {
            "file": {"type": "string", "contentMediaType": "application/octet-stream",
                     "description": "the audio file (wav, flac, mp3, ogg, ...)"},
            "model": {"type": "string"}, "language": {"type": "string"},
            "prompt": {"type": "string"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            "response_format": {"enum": list(RESPONSE_FORMATS)},
            "timestamp_granularities[]": {"type": "array",
                                          "items": {"enum": ["word", "segment"]}},
            "stream": {"type": "boolean"}}},
    "Version": {"type": "object", "required": ["version"],
                "properties": {"version": {"type": "string"}}},
    "Load": {"type": "object", "properties": {
        "server_load": {"type": "integer"}, "num_requests_running": {"type": "integer"},
        "num_requests_waiting": {"type": "integer"}, "kv_cache_usage_perc": {"type": "number"}}},
    "IsSleeping": {"type": "object", "required": ["is_sleeping"],
                   "properties": {"is_sleeping": {"type": "boolean"}}},
    "TokenizerInfo": {
        "type": "object", "required": ["tokenizer_class"], "additionalProperties": True,
        "description": "The tokenizer's tokenizer_config.json without file paths, special "
        "tokens as their text (vLLM's shape).",
        "properties": {"tokenizer_class": {"type": "string"},
                       "chat_template": {"type": "string"},
                       "model_max_length": {"type": "number"},
                       "bos_token": {"type": ["string", "null"]},
                       "eos_token": {"type": ["string", "null"]},
                       "pad_token": {"type": ["string", "null"]},
                       "unk_token": {"type": ["string", "null"]},
                       "added_tokens_decoder": {"type": "object",
                                                "additionalProperties": {"type": "string"}}}},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


# ---- the operations of each route -------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One documented operation. `body`/`result`: a struct type, a typing union of them, a
    schema dict or None; `events`: what each SSE `data:` line holds when stream=true."""

    summary: str
    tag: str
    body: Any = None
    result: Any = None
    result_type: str = "application/json"
    events: Any = None
    example: dict[str, Any] | None = None
    path: str | None = None  # the OpenAPI path when it differs from the route's
    query: tuple[tuple[str, dict[str, Any], str], ...] = ()
    runner: str | None = None  # "pooling" or "speech": 501 on other models
    form: bool = False  # multipart/form-data body
    anthropic: bool = False  # errors in Anthropic's shape
    extra: dict[str, Any] = field(default_factory=dict)


_CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
_COMPLETION_EXAMPLE = {"prompt": "Once upon a time", "max_tokens": 8}
_EMPTY = {"type": "string", "maxLength": 0, "description": "an empty body"}
_RID = "/v1/responses/{response_id}"
_PAGE = (("order", {"enum": ["asc", "desc"]}, "desc (default) or asc"),
         ("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "items per page (20)"),
         ("after", {"type": "string"}, "an item id: the page starts after it"))
_TRANSCRIPT = {"anyOf": [_ref("TranscriptionResponse"), _ref("TranscriptionVerboseResponse"),
                         {"type": "string", "description": "text, srt or vtt"}]}

OPERATIONS: dict[tuple[str, str], tuple[Op, ...]] = {
    ("GET", "/v1/models"): (Op("The served model names", "models", result=oai.ModelList),),
    ("GET", "/v1/models/{model}"): (Op("One served model", "models", result=oai.ModelCard),),
    ("POST", "/v1/models/{rest}"): (
        Op("Load a model now (a many-model server); answers once it is loaded", "models",
           result=oai.ModelCard, path="/v1/models/{model}/load"),
        Op("Unload a model (a many-model server): its engine drains, then stops", "models",
           result=oai.ModelCard, path="/v1/models/{model}/unload")),
    ("POST", "/v1/chat/completions"): (Op(
        "Chat completion", "generate", oai.ChatCompletionRequest, oai.ChatCompletionResponse,
        events=oai.ChatCompletionChunk, example=_CHAT_EXAMPLE),),
    ("POST", "/v1/chat/completions/batch"): (Op(
        "Several chat conversations in one call", "generate", _ref("ChatBatchRequest"),
        oai.ChatCompletionResponse,
        example={"messages": [[{"role": "user", "content": "Hi"}],
                              [{"role": "user", "content": "Bye"}]], "max_tokens": 4}),),
    ("POST", "/v1/completions"): (Op(
        "Text completion", "generate", oai.CompletionRequest, oai.CompletionResponse,
        events=oai.CompletionChunk, example=_COMPLETION_EXAMPLE),),
    ("POST", "/v1/responses"): (Op(
        "Create a response (OpenAI Responses API)", "responses", ResponsesRequest,
        _ref("ResponseObject"), events=_OBJ,
        example={"input": "Hello!", "max_output_tokens": 8}),),
    ("GET", "/v1/responses/{rest}"): (
        Op("A stored response (its own API key only)", "responses",
           result=_ref("ResponseObject"), path=_RID),
        Op("The input items of a stored response", "responses", result=_ref("InputItemList"),
           path=_RID + "/input_items", query=_PAGE)),
    ("DELETE", "/v1/responses/{rest}"): (Op(
        "Delete a stored response", "responses", result=_ref("ResponseDeleted"), path=_RID),),
    ("POST", "/v1/responses/{rest}"): (Op(
        "Cancel a background response", "responses", result=_ref("ResponseObject"),
        path=_RID + "/cancel"),),
    ("POST", "/v1/messages"): (Op(
        "Anthropic Messages API", "anthropic", anth.MessagesRequest, anth.Message, events=_OBJ,
        anthropic=True, example={"max_tokens": 8,
                                 "messages": [{"role": "user", "content": "Hello!"}]}),),
    ("POST", "/v1/messages/count_tokens"): (Op(
        "Anthropic token count", "anthropic", anth.CountTokensRequest, anth.CountTokensResponse,
        anthropic=True, example={"messages": [{"role": "user", "content": "Hello!"}]}),),
    ("POST", "/v1/embeddings"): (Op(
        "Embeddings", "pooling", pool.EmbeddingRequest, pool.EmbeddingResponse,
        runner="pooling", example={"input": "Hello!"}),),
    ("POST", "/v2/embed"): (Op(
        "Cohere-style embeddings", "pooling", pool.CohereEmbedRequest, pool.CohereEmbedResponse,
        runner="pooling", example={"texts": ["Hello!"], "input_type": "search_document"}),),
    ("POST", "/pooling"): (Op("Raw pooled outputs", "pooling", pool.PoolingRequest,
                              pool.PoolingResponse, runner="pooling",
                              example={"input": "Hello!"}),),
    ("POST", "/classify"): (Op("Classification", "pooling", pool.ClassificationRequest,
                               pool.ClassificationResponse, runner="pooling",
                               example={"input": "Hello!"}),),
    ("POST", "/rerank"): (Op("Rerank documents", "pooling", pool.RerankRequest,
                             pool.RerankResponse, runner="pooling",
                             example={"query": "sea", "documents": ["waves", "sand"]}),),
    ("POST", "/v1/audio/transcriptions"): (Op(
        "Transcribe audio (Whisper models)", "audio", _ref("AudioForm"),
        _TRANSCRIPT, events=Union[aud.TranscriptTextDelta, aud.TranscriptTextDone],  # noqa: UP007
        runner="speech", form=True),),
    ("POST", "/tokenize"): (Op("Tokenize a prompt or a conversation", "tokenize",
                               oai.TokenizeRequest, oai.TokenizeResponse,
                               example={"prompt": "Hello!"}),),
    ("POST", "/detokenize"): (Op("Token ids to text", "tokenize", oai.DetokenizeRequest,
                                 oai.DetokenizeResponse, example={"tokens": [1, 2, 3]}),),
    ("GET", "/tokenizer_info"): (Op(
        "The tokenizer's config, class and chat template (--enable-tokenizer-info-endpoint)",
        "tokenize", result=_ref("TokenizerInfo")),),
    ("POST", "/v1/chat/completions/render"): (Op(
        "The prompt of a chat request as the engine would get it (token ids, text, sampling "
        "parameters), without generating", "generate", oai.ChatCompletionRequest,
        GenerateRequest, example=_CHAT_EXAMPLE),),
    ("POST", "/v1/completions/render"): (Op(
        "The prompts of a completion request as the engine would get them, one each, without "
        "generating", "generate", oai.CompletionRequest, list[GenerateRequest],
        example=_COMPLETION_EXAMPLE),),
    ("GET", "/health_generate"): (Op(
        "200 when the engine runs a one-token generation within 10 s, else 503 (SGLang's)",
        "system", result=_EMPTY, result_type="text/plain"),),
    ("POST", "/invocations"): (Op(
        "SageMaker: routed by the body's fields (messages, prompt, input, query+documents, "
        "text_1+text_2)", "generate",
        {"anyOf": [_ref("ChatCompletionRequest"), _ref("CompletionRequest"),
                   _ref("EmbeddingRequest"), _ref("RerankRequest"), _ref("ScoreRequest")]},
        {"anyOf": [_ref("ChatCompletionResponse"), _ref("CompletionResponse"),
                   _ref("EmbeddingResponse"), _ref("ClassificationResponse"),
                   _ref("RerankResponse"), _ref("ScoreResponse")]},
        example=_COMPLETION_EXAMPLE),),
    ("GET", "/health"): (Op("200 while the engine serves; 503 when it is dead, stalled or "
                            "draining", "system", result=_EMPTY, result_type="text/plain",
                            query=(("deep", {"enum": ["0", "1", "true", "false"]},
                                    "1: also run a one-token generation"),)),),
    ("GET", "/ping"): (Op("As /health (SageMaker)", "system", result=_EMPTY,
                          result_type="text/plain"),),
    ("GET", "/version"): (Op("The fornax version", "system", result=_ref("Version")),),
    ("GET", "/load"): (Op("Requests running and waiting, KV use", "system",
                          result=_ref("Load")),),
    ("GET", "/metrics"): (Op("Prometheus metrics", "system", result={"type": "string"},
                             result_type="text/plain"),),
    ("GET", "/openapi.json"): (Op("This document", "system", result={"type": "object"}),),
    ("GET", "/docs"): (Op("A readable page of this document (offline)", "system",
                          result={"type": "string"}, result_type="text/html"),),
    ("POST", "/sleep"): (Op("Drop the KV cache (level 1) and the weights (level 2)", "dev",
                            result=_EMPTY, result_type="text/plain",
                            query=(("level", {"enum": ["1", "2"]}, "1 (default) or 2"),)),),
    ("POST", "/wake_up"): (Op("Wake up from /sleep", "dev", result=_EMPTY,
                              result_type="text/plain"),),
    ("GET", "/is_sleeping"): (Op("Whether the engine sleeps", "dev",
                                 result=_ref("IsSleeping")),),
    ("POST", "/reset_prefix_cache"): (Op("Forget every cached block", "dev", result=_EMPTY,
                                         result_type="text/plain"),),
}
# the same operation under several paths
OPERATIONS[("POST", "/v1/audio/translations")] = (Op(
    "Translate audio to English text (multilingual Whisper models)", "audio", _ref("AudioForm"),
    OPERATIONS[("POST", "/v1/audio/transcriptions")][0].result, runner="speech", form=True),)
for _path in ("/v1/rerank", "/v2/rerank"):
    OPERATIONS[("POST", _path)] = OPERATIONS[("POST", "/rerank")]
for _path in ("/score", "/v1/score"):
    OPERATIONS[("POST", _path)] = (Op("Score text pairs", "pooling", pool.ScoreRequest,
                                      pool.ScoreResponse, runner="pooling",
                                      example={"text_1": "sea", "text_2": "waves"}),)
OPERATIONS[("POST", "/ping")] = OPERATIONS[("GET", "/ping")]
OPERATIONS[("POST", "/v1/tokenize")] = OPERATIONS[("POST", "/tokenize")]
OPERATIONS[("POST", "/v1/detokenize")] = OPERATIONS[("POST", "/detokenize")]
OPERATIONS[("GET", "/get_tokenizer_info")] = OPERATIONS[("GET", "/tokenizer_info")]
_STRUCTS = (oai.ChatCompletionRequest, oai.CompletionRequest, pool.EmbeddingRequest,
            pool.RerankRequest, pool.ScoreRequest, pool.ClassificationResponse,
            oai.ErrorResponse, anth.ErrorResponse, aud.TranscriptionResponse,
            aud.TranscriptionVerboseResponse)

# ---- the document -----------------------------------------------------------------------------


def _is_schema(value: Any) -> bool:
    return isinstance(value, dict)


def _types(ops: list[Op]) -> list[Any]:
    """Every struct type (or union of them) the operations name, in a stable order."""
    seen: dict[str, Any] = {}
    for value in [*_STRUCTS, *(v for op in ops for v in (op.body, op.result, op.events))]:
        if value is not None and not _is_schema(value):
            seen.setdefault(repr(value), value)
    return list(seen.values())


def _errors(op: Op, error_ref: dict[str, Any], protected: bool) -> dict[str, Any]:
    def err(text: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"description": text,
                               "content": {"application/json": {"schema": error_ref}}}
        if headers:
            out["headers"] = headers
        return out

    retry = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}
    out = {"400": err("bad input; `param` names the field"),
           "404": err("unknown model, route or id"),
           "503": err("overloaded (with Retry-After), draining, or the engine is down", retry),
           "default": err("an error, in this shape")}
    if protected:
        out["401"] = err("a valid API key is required")
    if op.body is not None:
        out["413"] = err("the body is larger than --max-request-body-bytes")
    if op.runner:
        out["501"] = err(f"the served model is not a {op.runner} model")
    if op.tag == "responses":
        out["429"] = err("too many background responses for this API key", retry)
    return out


def _operation(op: Op, method: str, schema_of: dict[str, Any], protected: bool,
               route_path: str) -> dict[str, Any]:
    def schema(value: Any) -> dict[str, Any]:
        return value if _is_schema(value) else schema_of[repr(value)]

    error_ref = _ref("fornax.api.protocol.anthropic.ErrorResponse" if op.anthropic else
                     "fornax.api.protocol.openai.ErrorResponse")
    ok: dict[str, Any] = {"schema": schema(op.result)}
    content = {op.result_type: ok}
    if op.events is not None:
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": "server-sent events (stream=true): "
                       "each `data:` line holds one event as JSON"},
            "x-fornax-event": schema(op.events)}
    doc: dict[str, Any] = {
        "operationId": f"{method.lower()}_{(op.path or route_path).strip('/')}".replace(
            "/", "_").replace("{", "").replace("}", "").replace(".", "_"),
        "summary": op.summary, "tags": [op.tag],
        "responses": {"200": {"description": "success", "content": content},
                      **_errors(op, error_ref, protected)}}
    params = [{"name": name, "in": "query", "required": False, "schema": sch,
               "description": text} for name, sch, text in op.query]
    path = op.path or route_path
    for name in ("model", "response_id"):
        if "{" + name + "}" in path:
            params.append({"name": name, "in": "path", "required": True,
                           "schema": {"type": "string"}})
    if params:
        doc["parameters"] = params
    if op.body is not None:
        media = "multipart/form-data" if op.form else "application/json"
        body: dict[str, Any] = {"schema": schema(op.body)}
        if op.example is not None:
            body["examples"] = {"basic": {"value": op.example}}
        doc["requestBody"] = {"required": True, "content": {media: body}}
    if not protected:
        doc["security"] = []
    return doc


def _portable_patterns(node: Any) -> None:
    """Python's \\A and \\Z anchors as ^ and $: JSON Schema patterns are ECMA-262 regexes."""
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            if pattern.startswith("\\A"):
                pattern = "^" + pattern[2:]
            if pattern.endswith("\\Z"):
                pattern = pattern[:-2] + "$"
            node["pattern"] = pattern
        for value in node.values():
            _portable_patterns(value)
    elif isinstance(node, list):
        for value in node:
            _portable_patterns(value)


def build_document(api_keys: bool, include_dev: bool, version: str = "",
                   settings: ServerSettings | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in ROUTES (the dev ones when `include_dev`);
    with `settings`, of the routes that exist on that server (Route.enabled)."""
    from fornax.api.server.app import ROUTES  # the app imports this module

    routes = [r for r in ROUTES if r.enabled(settings)] if settings is not None else \
        [r for r in ROUTES if include_dev or not r.dev]
    ops = [op for r in routes for m in r.methods for op in OPERATIONS.get((m, r.path), ())]
    types = _types(ops)
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    schema_of = {repr(t): s for t, s in zip(types, schemas, strict=True)}
    components.update(_SCHEMAS)
    _portable_patterns(components)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        protected = api_keys and not route.public
        for method in route.methods:
            for op in OPERATIONS.get((method, route.path)) or (
                    Op("(undocumented)", "other", result=_OBJ,
                       extra={"x-undocumented": True}),):
                doc = _operation(op, method, schema_of, protected, route.path)
                doc.update(op.extra)
                paths.setdefault(op.path or route.path, {})[method.lower()] = doc
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "fornax", "version": version or "0",
                 "description": "An OpenAI- and vLLM-compatible inference server. Errors have "
                 "the shape {error: {message, type, param, code}} (Anthropic's on "
                 "/v1/messages). Routes for another kind of model answer 501."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
        "tags": [{"name": t} for t in dict.fromkeys(op.tag for op in ops)],
    }
    if api_keys:
        document["security"] = [{"bearer": []}, {"x-api-key": []}]
    return document


async def openapi_json(req: Request) -> Response:
    settings = req.state.settings
    key = (bool(settings.api_keys), bool(settings.enable_dev_endpoints),
           bool(settings.enable_tokenizer_info_endpoint))
    body = _cache.get(key)
    if body is None:
        body = _cache[key] = msgspec.json.encode(build_document(
            key[0], key[1], settings.version, settings=settings))
    return Response(body, 200)
