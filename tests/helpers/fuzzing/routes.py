"""Every route of api/server/app.py's ROUTES with its request struct, valid seed bodies and the servers
that serve it (fuzzer process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fornax.api.protocol import anthropic, openai, pooling, responses

# The fleet's server kinds: a tiny llama (generation), a tiny BERT embedder (embed, score,
# rerank), a tiny BERT classifier (classify), Whisper tiny.en (audio, realtime) and a many-model
# server of two tiny chat models with one loaded at a time (loads, unloads, keep_alive).
GEN, EMBED, CLS, ASR, MANY = "gen", "embed", "cls", "asr", "many"
ALL = frozenset({GEN, EMBED, CLS, ASR, MANY})
MODEL_NAMES = {GEN: "tiny", EMBED: "emb", CLS: "cls", ASR: "asr", MANY: "a"}
MANY_MODELS = ("a", "b")  # the many-model server's models (MODEL_NAMES[MANY] is the first)
_GEN = frozenset({GEN, MANY})

USER = [{"role": "user", "content": "hi there"}]
CHAT_SEEDS: tuple[dict[str, Any], ...] = (
    {"messages": USER, "max_tokens": 8},
    {"messages": [{"role": "system", "content": "be brief"}, *USER], "max_tokens": 4, "n": 2,
     "temperature": 0.8, "top_k": 5, "seed": 1},
    {"messages": USER, "max_tokens": 6, "logprobs": True, "top_logprobs": 3},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                  {"role": "assistant", "content": "b"}, *USER], "max_tokens": 3},
    {"messages": USER, "max_tokens": 8, "response_format": {"type": "json_object"}},
    {"messages": USER, "max_tokens": 8, "guided_choice": ["yes", "no"]},
    {"messages": USER, "max_tokens": 8, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}],
     "tool_choice": "auto"},
    {"messages": USER, "max_tokens": 4, "use_beam_search": True, "n": 2},
)
COMPLETION_SEEDS: tuple[dict[str, Any], ...] = (
    {"prompt": "hi", "max_tokens": 8},
    {"prompt": [1, 2, 3], "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [5]},
    {"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 3, "n": 2},
    {"prompt": ["a", "b"], "max_tokens": 5, "logprobs": 2, "echo": True},
    {"prompt": "hi", "max_tokens": 6, "stop": ["\n", "x"], "logit_bias": {"5": 3.0},
     "allowed_token_ids": [5, 6, 7], "bad_words": ["z"]},
    {"prompt": "the", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "min_p": 0.1,
     "repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.5},
    {"prompt": "hi", "max_tokens": 4, "prompt_logprobs": 1, "best_of": 2, "n": 1},
    {"prompt": "hi", "max_tokens": 8, "guided_regex": "[a-z]+", "request_id": "fuzz-1"},
    {"prompt": "hi", "max_tokens": 8, "guided_json": {"type": "object"}},
    {"prompt": "hi", "max_tokens": 8, "repetition_detection": {"max_pattern_size": 4,
                                                               "min_count": 2}},
)
RESPONSE_SEEDS: tuple[dict[str, Any], ...] = (
    {"input": "hi", "max_output_tokens": 8},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
     "instructions": "short", "max_output_tokens": 6, "store": True},
    {"input": "hi", "max_output_tokens": 6, "background": True},
    {"input": "hi", "max_output_tokens": 6, "text": {"format": {"type": "json_schema",
                                                                 "name": "x", "schema": {
                                                                     "type": "object"}}}},
)
MESSAGES_SEEDS: tuple[dict[str, Any], ...] = (
    {"max_tokens": 8, "messages": USER},
    {"max_tokens": 4, "system": "brief", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}], "stop_sequences": ["x"], "top_k": 3},
    {"max_tokens": 8, "messages": USER, "tools": [{"name": "f", "input_schema": {
        "type": "object"}}], "tool_choice": {"type": "auto"}},
)
EMBED_INPUTS: tuple[dict[str, Any], ...] = (
    {"input": "hello world"},
    {"input": ["a cat", "a dog"], "encoding_format": "base64"},
    {"input": [1, 2, 3]},
    {"input": [[1, 2], [3]], "dimensions": 8},
    {"messages": USER},
)


@dataclass(frozen=True)
class Target:
    """One route: how to reach it, what it takes and which server kinds serve it."""

    name: str  # the route key in the campaign's statistics
    method: str
    path: str  # may hold "{id}": filled from responses the campaign made (or edge text)
    servers: frozenset[str]  # kinds that serve it; elsewhere a 501 is a correct answer
    struct: type | None = None
    seeds: tuple[dict[str, Any], ...] = ()
    body: str = "json"  # "json", "multipart" (audio) or "none"
    streams: bool = False
    anthropic_errors: bool = False


_POOL = frozenset({EMBED})
TARGETS: tuple[Target, ...] = (
    Target("chat", "POST", "/v1/chat/completions", _GEN,
           openai.ChatCompletionRequest, CHAT_SEEDS, streams=True),
    Target("chat_batch", "POST", "/v1/chat/completions/batch", _GEN,
           openai.ChatCompletionRequest,
           ({"messages": [USER, [{"role": "user", "content": "b"}]], "max_tokens": 4},)),
    Target("completions", "POST", "/v1/completions", _GEN, openai.CompletionRequest,
           COMPLETION_SEEDS, streams=True),
    Target("responses", "POST", "/v1/responses", _GEN, responses.ResponsesRequest,
           RESPONSE_SEEDS, streams=True),
    Target("responses_get", "GET", "/v1/responses/{id}", ALL, body="none"),
    Target("responses_input_items", "GET", "/v1/responses/{id}/input_items", ALL, body="none"),
    Target("responses_delete", "DELETE", "/v1/responses/{id}", ALL, body="none"),
    Target("responses_cancel", "POST", "/v1/responses/{id}/cancel", ALL, body="none"),
    Target("messages", "POST", "/v1/messages", _GEN, anthropic.MessagesRequest,
           MESSAGES_SEEDS, streams=True, anthropic_errors=True),
    Target("messages_count_tokens", "POST", "/v1/messages/count_tokens", _GEN,
           anthropic.CountTokensRequest, ({"messages": USER},), anthropic_errors=True),
    Target("embeddings", "POST", "/v1/embeddings", _POOL, pooling.EmbeddingRequest, EMBED_INPUTS),
    Target("pooling", "POST", "/pooling", _POOL, pooling.PoolingRequest, EMBED_INPUTS),
    Target("v2_embed", "POST", "/v2/embed", _POOL, pooling.CohereEmbedRequest,
           ({"texts": ["a", "b"], "input_type": "search_query"},
            {"texts": ["a"], "embedding_types": ["float", "base64"], "output_dimension": 8})),
    Target("classify", "POST", "/classify", frozenset({CLS}), pooling.ClassificationRequest,
           ({"input": "good"}, {"input": ["bad", "fine"]}, {"messages": USER})),
    *(Target(f"score{p.replace('/', '_')}", "POST", p, _POOL, pooling.ScoreRequest,
             ({"text_1": "a", "text_2": ["b", "c"]}, {"queries": "a", "documents": ["b"]},
              {"text_1": ["a", "b"], "text_2": ["c", "d"]}))
      for p in ("/score", "/v1/score")),
    *(Target(f"rerank{p.replace('/', '_')}", "POST", p, _POOL, pooling.RerankRequest,
             ({"query": "a", "documents": ["b", "c"], "top_n": 1},
              {"query": "a", "documents": [{"text": "b"}], "return_documents": False}))
      for p in ("/rerank", "/v1/rerank", "/v2/rerank")),
    Target("audio_transcriptions", "POST", "/v1/audio/transcriptions", frozenset({ASR}),
           body="multipart", streams=True),
    Target("audio_translations", "POST", "/v1/audio/translations", frozenset({ASR}),
           body="multipart", streams=True),
    Target("tokenize", "POST", "/tokenize", ALL, openai.TokenizeRequest,
           ({"prompt": "hi there"}, {"messages": USER, "return_token_strs": True})),
    Target("detokenize", "POST", "/detokenize", ALL, openai.DetokenizeRequest,
           ({"tokens": [1, 2, 3]},)),
    Target("v1_tokenize", "POST", "/v1/tokenize", ALL, openai.TokenizeRequest,
           ({"prompt": "hi there", "add_special_tokens": False},
            {"messages": USER, "add_generation_prompt": False})),
    Target("v1_detokenize", "POST", "/v1/detokenize", ALL, openai.DetokenizeRequest,
           ({"tokens": [4, 5]},)),
    Target("chat_render", "POST", "/v1/chat/completions/render", _GEN,
           openai.ChatCompletionRequest, CHAT_SEEDS[:7]),
    Target("completions_render", "POST", "/v1/completions/render", _GEN,
           openai.CompletionRequest, COMPLETION_SEEDS[:6]),
    Target("tokenizer_info", "GET", "/tokenizer_info", ALL, body="none"),
    Target("get_tokenizer_info", "GET", "/get_tokenizer_info", ALL, body="none"),
    Target("health_generate", "GET", "/health_generate", ALL, body="none"),
    Target("invocations", "POST", "/invocations", ALL, None,
           (*CHAT_SEEDS[:2], *COMPLETION_SEEDS[:2], *EMBED_INPUTS[:2],
            {"query": "a", "documents": ["b"]}, {"text_1": "a", "text_2": "b"})),
    Target("models", "GET", "/v1/models", ALL, body="none"),
    Target("model", "GET", "/v1/models/{id}", ALL, body="none"),
    Target("model_load", "POST", "/v1/models/{id}/load", ALL, body="none"),  # 400 but on MANY
    Target("model_unload", "POST", "/v1/models/{id}/unload", ALL, body="none"),
    *(Target(p.strip("/"), m, p, ALL, body="none")
      for p, m in (("/health", "GET"), ("/ping", "GET"), ("/ping", "POST"), ("/version", "GET"),
                   ("/load", "GET"), ("/metrics", "GET"))),
    Target("unknown_path", "GET", "/v1/{id}", ALL, body="none"),
)
# GET /ping and POST /ping share a name above; keep the stats keys distinct
TARGETS = tuple(t if not (t.name == "ping" and t.method == "POST") else
                Target("ping_post", t.method, t.path, t.servers, body="none") for t in TARGETS)
ROUTE_NAMES = tuple(t.name for t in TARGETS)
