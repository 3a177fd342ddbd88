"""Offline pooling API for `LLM`: `embed`, `classify`, `score`, `encode` as vLLM (one process).

`LLM` inherits `PoolingMixin`; the methods need a pooling model (`LLM(path)` of an embedding model
or cross-encoder, or `LLM(path, runner="pooling")` for a decoder used as an embedder).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from fornax.runtime.engine.messages import (
    EngineCoreRequest,
    PoolingModelInfo,
    PoolingOutput,
    PoolingParams,
)
from fornax.runtime.errors import RequestError, RequestFailedError
from fornax.runtime.pooling.io import (
    PoolingTokenizer,
    cosine,
    output_values,
    pair_indices,
    resolve_truncation,
)
from fornax.runtime.sampling.params import SamplingParams

if TYPE_CHECKING:
    from fornax.runtime.engine.contract import EngineCore

T = TypeVar("T")
_NO_SAMPLING = SamplingParams(max_tokens=1)


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class PoolingData:
    data: list[float]


@dataclass
class PoolingRequestOutput(Generic[T]):
    """One input's result: `outputs` holds the embedding / probabilities / score / raw data."""

    request_id: str
    outputs: T
    prompt_token_ids: list[int]
    finished: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


EmbeddingRequestOutput = PoolingRequestOutput[EmbeddingOutput]
ClassificationRequestOutput = PoolingRequestOutput[ClassificationOutput]
ScoringRequestOutput = PoolingRequestOutput[ScoringOutput]

PromptLike = str | list[int] | dict[str, Any]


class PoolingMixin:
    """Pooling methods of the offline `LLM` (its `engine`, `tokenizer` and `_counter`)."""

    engine: EngineCore
    tokenizer: Any
    _counter: itertools.count

    # ---- public API ----------------------------------------------------------------------------
    def embed(self, prompts: PromptLike | Sequence[PromptLike], *,
              truncate_prompt_tokens: int | None = None, dimensions: int | None = None,
              normalize: bool | None = None) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (pooled as the model's sentence-transformers files say)."""
        ids = self._prompt_ids(prompts, truncate_prompt_tokens)
        params = PoolingParams("embed", dimensions=dimensions, normalize=normalize)
        outs = self._run_pooling(ids, None, params)
        return [PoolingRequestOutput(rid, EmbeddingOutput(output_values(o)), t)
                for (rid, o), t in zip(outs, ids)]

    def classify(self, prompts: PromptLike | Sequence[PromptLike], *,
                 truncate_prompt_tokens: int | None = None,
                 activation: bool = True) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (labels: `self.labels`, from config.json's id2label)."""
        ids = self._prompt_ids(prompts, truncate_prompt_tokens)
        outs = self._run_pooling(ids, None, PoolingParams("classify", activation=activation))
        return [PoolingRequestOutput(rid, ClassificationOutput(output_values(o)), t)
                for (rid, o), t in zip(outs, ids)]

    def encode(self, prompts: PromptLike | Sequence[PromptLike], *,
               truncate_prompt_tokens: int | None = None
               ) -> list[PoolingRequestOutput[PoolingData]]:
        """The model's default pooled output per prompt (what `/pooling` returns)."""
        ids = self._prompt_ids(prompts, truncate_prompt_tokens)
        outs = self._run_pooling(ids, None, PoolingParams("encode"))
        return [PoolingRequestOutput(rid, PoolingData(output_values(o)), t)
                for (rid, o), t in zip(outs, ids)]

    def score(self, data_1: str | Sequence[str], data_2: str | Sequence[str], *,
              truncate_prompt_tokens: int | None = None) -> list[ScoringRequestOutput]:
        """Relevance of each (data_1, data_2) pair: 1 x N or N x N (zipped). A cross-encoder scores
        the pair with its head; an embedding model by the cosine of the two embeddings."""
        texts_1 = [data_1] if isinstance(data_1, str) else list(data_1)
        texts_2 = [data_2] if isinstance(data_2, str) else list(data_2)
        pairs = pair_indices(len(texts_1), len(texts_2), "data_1", "data_2")
        info = self._pooling_info()
        if "score" not in info.tasks:
            raise RequestError(f"{info.architecture} with {len(info.labels)} labels cannot score "
                               "pairs; use classify()", "model")
        limit = resolve_truncation(truncate_prompt_tokens, info.max_model_len)
        tok = self._pooling_tokenizer()
        if info.head == "classify":
            encoded = tok.pairs([(texts_1[i], texts_2[j]) for i, j in pairs], limit)
            outs = self._run_pooling([e[0] for e in encoded], [e[1] for e in encoded],
                                     PoolingParams("score"))
            return [PoolingRequestOutput(rid, ScoringOutput(output_values(o)[0]), e[0])
                    for (rid, o), e in zip(outs, encoded)]
        ids = tok.texts(texts_1 + texts_2, limit)
        outs = self._run_pooling(ids, None, PoolingParams("embed"))
        vectors = [output_values(o) for _, o in outs]
        n1 = len(texts_1)
        return [PoolingRequestOutput(f"{outs[i][0]}-{outs[n1 + j][0]}",
                                     ScoringOutput(cosine(vectors[i], vectors[n1 + j])),
                                     ids[i] + ids[n1 + j]) for i, j in pairs]

    @property
    def labels(self) -> list[str]:
        return list(self._pooling_info().labels)

    # ---- internals -----------------------------------------------------------------------------
    def _pooling_info(self) -> PoolingModelInfo:
        info = self.engine.pooling_info
        if info is None:
            raise RequestError("this model runs as a generation model; embeddings, classification "
                               "and scores need a pooling model (LLM(model, runner='pooling'))",
                               "model")
        return info

    def _pooling_tokenizer(self) -> PoolingTokenizer:
        info = self._pooling_info()
        return PoolingTokenizer(self.tokenizer, info.max_model_len, info.truncation_side)

    def _prompt_ids(self, prompts: Any, truncate_prompt_tokens: int | None) -> list[list[int]]:
        info = self._pooling_info()
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise RequestError("at least one prompt is needed", "prompts")
        limit = resolve_truncation(truncate_prompt_tokens, info.max_model_len)
        tok = self._pooling_tokenizer()
        prompts = [p.get("prompt_token_ids", p.get("prompt")) if isinstance(p, dict) else p
                   for p in prompts]
        if all(isinstance(p, str) for p in prompts):
            return tok.texts(prompts, limit, "prompts")  # one batched (Rust) tokenizer call
        out: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                out.extend(tok.texts([p], limit, "prompts"))
            elif isinstance(p, list) and all(isinstance(t, int) for t in p):
                out.extend(tok.token_ids([p], limit, "prompts"))
            else:
                raise RequestError(f"unsupported prompt type {type(p).__name__}", "prompts")
        return out

    def _run_pooling(self, token_lists: list[list[int]], type_lists: list[list[int]] | None,
                     params: PoolingParams) -> list[tuple[str, PoolingOutput]]:
        """Add every request, step until all are pooled; results in input order."""
        self._pooling_info()
        requests = []
        for i, ids in enumerate(token_lists):
            types = type_lists[i] if type_lists is not None else None
            requests.append(EngineCoreRequest(str(next(self._counter)), ids, _NO_SAMPLING,
                                              pooling_params=params, token_type_ids=types))
        for req in requests:
            self.engine.validate_request(req)  # refuse the whole batch before adding any
        for req in requests:
            self.engine.add_request(req)
        results: dict[str, PoolingOutput] = {}
        errors: list[str] = []  # requests the engine failed (the others still finish first)
        while len(results) + len(errors) < len(requests):
            if not self.engine.has_unfinished_requests():
                raise RuntimeError("the engine finished without pooling every request")
            for out in self.engine.step():
                if out.error is not None:
                    errors.append(out.error)
                elif out.pooled is not None:
                    results[out.request_id] = out.pooled
        if errors:
            raise RequestFailedError("; ".join(errors))
        return [(r.request_id, results[r.request_id]) for r in requests]
