"""Structs of the pooling routes: OpenAI embeddings, vLLM's pooling / classify / score, Jina /
Cohere rerank and Cohere embed (msgspec; API workers).

Inputs whose shape varies (string, list, token ids) are typed `Any` and checked by the handlers, so
that a bad shape is a 400 naming the field with a message that lists the accepted shapes.
"""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct

from fornax.api.protocol.bounded import (
    ChatTemplate,
    Int64,
    Messages,
    RequestId,
    TruncationSide,
    User,
)

# ---- shared ----------------------------------------------------------------------------------


class PoolingUsage(Struct):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class _ListResponse(Struct):
    """The list answer the pooling routes share; each one names the type of its `data`."""

    id: str
    created: int
    model: str
    data: list[Any]
    usage: PoolingUsage
    object: str = "list"


class _PoolingFields(Struct, kw_only=True):
    model: str | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: TruncationSide | None = None  # None: the model's tokenizer's side
    priority: Int64 = 0
    request_id: RequestId | None = None
    user: User | None = None


class _ChatInput(_PoolingFields, kw_only=True):
    """vLLM lets embedding-like requests give a conversation instead of `input`."""

    messages: Messages | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: ChatTemplate | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# ---- POST /v1/embeddings ---------------------------------------------------------------------


class EmbeddingRequest(_ChatInput, kw_only=True):
    input: Any = None  # str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None
    use_activation: bool | None = None  # newer vLLM's name for normalize (normalize wins)


class EmbeddingData(Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingResponse(_ListResponse):
    data: list[EmbeddingData]


# ---- POST /pooling ---------------------------------------------------------------------------


class PoolingRequest(EmbeddingRequest, kw_only=True):
    task: str | None = None  # embed | classify | encode (default: the model's own output)


class PoolingData(Struct):
    index: int
    data: list[float] | str
    object: str = "pooling"


class PoolingResponse(_ListResponse):
    data: list[PoolingData]


# ---- POST /classify --------------------------------------------------------------------------


class ClassificationRequest(_ChatInput, kw_only=True):
    input: Any = None
    activation: bool | None = None
    use_activation: bool | None = None


class ClassificationData(Struct):
    index: int
    label: str
    probs: list[float]
    num_classes: int
    object: str = "classify"


class ClassificationResponse(_ListResponse):
    data: list[ClassificationData]


# ---- POST /score, /v1/score --------------------------------------------------------------------


class ScoreRequest(_PoolingFields, kw_only=True):
    text_1: Any = None
    text_2: Any = None
    queries: Any = None  # vLLM's newer names: queries + documents (or items), data_1 + data_2
    documents: Any = None
    items: Any = None
    data_1: Any = None
    data_2: Any = None
    activation: bool | None = None
    use_activation: bool | None = None


class ScoreData(Struct):
    index: int
    score: float
    object: str = "score"


class ScoreResponse(_ListResponse):
    data: list[ScoreData]


# ---- POST /rerank, /v1/rerank (Jina), /v2/rerank (Cohere) ------------------------------------


class RerankRequest(_PoolingFields, kw_only=True):
    query: Any = None
    documents: Any = None  # list[str] or list[{"text": str}]
    top_n: int | None = None  # None or 0: every document
    return_documents: bool = True
    max_tokens_per_doc: int | None = None  # Cohere v2: documents are cut to this many tokens


class RerankDocument(Struct):
    text: str


class RerankResult(Struct, omit_defaults=True):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class ApiVersion(Struct):
    version: str


class BilledUnits(Struct, omit_defaults=True):
    search_units: int | None = None
    input_tokens: int | None = None


class CohereMeta(Struct):
    api_version: ApiVersion
    billed_units: BilledUnits


class RerankUsage(Struct):
    total_tokens: int
    prompt_tokens: int


class RerankResponse(Struct, omit_defaults=True):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]
    meta: CohereMeta | None = None


# ---- POST /v2/embed (Cohere) -------------------------------------------------------------------


class CohereEmbedRequest(Struct, kw_only=True):
    model: str | None = None
    texts: Any = None
    inputs: Any = None  # [{"content": [{"type": "text", "text": ...}]}]
    images: Any = None
    input_type: str | None = None
    embedding_types: list[str] | None = None
    output_dimension: int | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    priority: Int64 = 0


class CohereEmbedResponse(Struct):
    id: str
    embeddings: dict[str, list[Any]]
    texts: list[str]
    meta: CohereMeta
    response_type: str = "embeddings_by_type"
