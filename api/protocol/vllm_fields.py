"""vLLM's request fields per route and what fornax does with each: the inventory (data; API workers).

Read from vLLM's own request models (vllm-project/vllm, 2025-2026 main: openai/chat_completion,
openai/completion, openai/responses, openai/speech_to_text, pooling/{base,pooling,scoring} and
anthropic protocol modules), plus the fields older vLLM releases (0.8-0.11) accepted that clients
still send (guided_*, best_of, ...). Each field is

- honoured: the fornax request struct declares it and the route acts on it (a value it cannot
  serve is a 400 naming it, by the route's own checks);
- ignored: accepted without effect, as vLLM itself does (`user`, render-only switches);
- rejected: a 400 naming the field when it carries anything but null or its neutral value (so a
  client that sends vLLM's defaults still works), with the reason below.

A key that is in neither the struct nor this table is not vLLM's: ignored with one warning per
field name per process (api/protocol/fields.py). tests/unit/test_vllm_fields.py checks both ways:
every vLLM field has a status, honoured fields are struct fields and struct fields are listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HONOURED = "honoured"
IGNORED = "ignored"
REJECTED = "rejected"


@dataclass(frozen=True)
class FieldStatus:
    status: str
    note: str = ""
    neutral: tuple[Any, ...] = ()  # rejected fields: values that mean "not used" (besides null)


def H(note: str = "") -> FieldStatus:
    return FieldStatus(HONOURED, note)


def I(note: str) -> FieldStatus:  # noqa: E743 - a one-letter table helper like H and R
    return FieldStatus(IGNORED, note)


def R(note: str, *neutral: Any) -> FieldStatus:
    return FieldStatus(REJECTED, note, neutral)


_NO_MM = "this server serves text-only models (no multimodal processor)"
_NO_DISAGG = "no disaggregated prefill/encoder serving in fornax"
_NO_XARGS = ("honoured as {}; any key is a 400 naming it: fornax has no custom logits-processor "
             "extensions to pass it to")
_RENDER_ONLY = "vLLM reads it on the /render routes only and ignores it on generation routes"

# ---- generation fields chat and completions share ----------------------------------------------
_SAMPLING: dict[str, FieldStatus] = {
    "model": H(), "frequency_penalty": H(), "presence_penalty": H(), "logit_bias": H(),
    "max_tokens": H(), "n": H(), "seed": H(), "stop": H(), "stream": H(),
    "stream_options": H(), "temperature": H(), "top_p": H(), "response_format": H(),
    "user": I("recorded nowhere, as in vLLM"),
    "use_beam_search": H(), "top_k": H(), "min_p": H(), "repetition_penalty": H(),
    "length_penalty": H("beam search only"), "stop_token_ids": H(),
    "include_stop_str_in_output": H(), "ignore_eos": H(), "min_tokens": H(),
    "skip_special_tokens": H(), "spaces_between_special_tokens": H(),
    "truncate_prompt_tokens": H(), "truncation_side": H("left keeps the last tokens (default)"),
    "prompt_logprobs": H(), "allowed_token_ids": H(), "bad_words": H(), "echo": H(),
    "structured_outputs": H(), "priority": H(), "request_id": H(), "cache_salt": H(),
    "return_tokens_as_token_ids": H(), "return_token_ids": H(), "repetition_detection": H(),
    "thinking_token_budget": H("with --reasoning-parser: the end-of-thinking marker is forced "
                               "after this many reasoning tokens"),
    "vllm_xargs": H(_NO_XARGS),
    "session_id": I("a routing hint for vLLM's KV connectors; one engine here"),
    "watermarking": R("no watermarking sampler in fornax", False),
    "logprob_token_ids": R("per-token logprobs of chosen ids are not built; use top_logprobs"),
    "routed_experts_prompt_start": R("no routed-expert traces are returned", 0),
    "return_token_offsets": I(_RENDER_ONLY),
    "return_mm_kwargs": I(_RENDER_ONLY),
    "kv_transfer_params": R(_NO_DISAGG),
    "ec_transfer_params": R(_NO_DISAGG),
    "stream_interval": R("every token is streamed as it is detokenized", 1),
    # older vLLM (0.8-0.11)
    "best_of": H(), "guided_json": H(), "guided_regex": H(), "guided_choice": H(),
    "guided_grammar": H(), "guided_decoding_backend": H("xgrammar always"),
    "guided_whitespace_pattern": H("a 400 when set: xgrammar has no such option"),
    "detokenize": H(),
    "logits_processors": R("no custom logits processors are loaded from requests"),
    "early_stopping": R("beam search stops at max_tokens or every beam's end", False),
}

CHAT: dict[str, FieldStatus] = {
    **_SAMPLING,
    "messages": H(), "logprobs": H(), "top_logprobs": H(), "max_completion_tokens": H(),
    "tools": H("function.strict: enforced where tool_choice is required or named (the "
               "arguments grammar), a hint under auto"),
    "tool_choice": H(), "parallel_tool_calls": H(),
    "reasoning_effort": H("passed to the template; 'none' sets enable_thinking=false"),
    "include_reasoning": H("false drops the reasoning from the answer"),
    "add_generation_prompt": H(), "continue_final_message": H(), "add_special_tokens": H(),
    "documents": H(), "chat_template": H(), "chat_template_kwargs": H(),
    "return_prompt_text": H(),
    "media_io_kwargs": R(_NO_MM), "mm_processor_kwargs": R(_NO_MM),
}

COMPLETIONS: dict[str, FieldStatus] = {
    **_SAMPLING,
    "prompt": H(), "logprobs": H(), "suffix": H("a 400 when set: no fill-in-the-middle"),
    "add_special_tokens": H(),
    "prompt_embeds": R("prompt embeddings are not accepted"),
}

RESPONSES: dict[str, FieldStatus] = {
    "background": H(), "include": H("message.output_text.logprobs; other values: 400"),
    "input": H(), "instructions": H(), "max_output_tokens": H(), "max_tool_calls": H(),
    "metadata": H(), "model": H(), "logit_bias": H(), "parallel_tool_calls": H(),
    "previous_response_id": H(), "reasoning": H("effort; summary is accepted, none is made"),
    "store": H(), "stream": H(), "temperature": H(), "text": H(), "tool_choice": H(),
    "tools": H(), "top_logprobs": H(), "top_p": H(), "top_k": H(), "truncation": H(),
    "user": H(), "skip_special_tokens": H(), "include_stop_str_in_output": H(),
    "request_id": H("only the x-request-id header; response ids are the server's"),
    "priority": H(), "cache_salt": H(), "structured_outputs": H(), "repetition_penalty": H(),
    "seed": H(), "stop": H(), "ignore_eos": H(), "vllm_xargs": H(_NO_XARGS),
    "service_tier": I("one tier here"), "prompt_cache_key": I("vLLM ignores it too"),
    "prompt": R("stored prompt templates are not supported (vLLM refuses them too)"),
    "mm_processor_kwargs": R(_NO_MM),
    "enable_response_messages": R("harmony message lists are not returned", False),
    "previous_input_messages": R("harmony message history is not accepted; use "
                                 "previous_response_id"),
    "previous_response": R("stateless turns carry encrypted reasoning, which fornax does not "
                           "make; use previous_response_id"),
}

_POOLING_BASE: dict[str, FieldStatus] = {
    "model": H(), "user": I("recorded nowhere, as in vLLM"), "truncate_prompt_tokens": H(),
    "truncation_side": H("none: the model tokenizer's own side"),
    "request_id": H(), "priority": H(),
    "padding": R("prompts are never padded", "do_not_pad"),
    "mm_processor_kwargs": R(_NO_MM),
    "cache_salt": I("pooling runs without a prefix cache"),
}
_POOLING_CHAT: dict[str, FieldStatus] = {
    "messages": H(), "add_generation_prompt": H(), "continue_final_message": H(),
    "add_special_tokens": H(), "chat_template": H(), "chat_template_kwargs": H(),
    "media_io_kwargs": R(_NO_MM),
}
_ENCODING: dict[str, FieldStatus] = {
    "encoding_format": H(),
    "embed_dtype": R("base64 embeddings are float32", "float32"),
    "endianness": R("base64 embeddings are little-endian", "native", "little"),
}

EMBEDDINGS: dict[str, FieldStatus] = {
    **_POOLING_BASE, **_POOLING_CHAT, **_ENCODING,
    "input": H(), "dimensions": H(), "normalize": H("older vLLM; newer ones refuse it"),
    "use_activation": H("newer vLLM's normalize; normalize wins when both are given"),
}
POOLING: dict[str, FieldStatus] = {**EMBEDDINGS, "task": H()}
CLASSIFY: dict[str, FieldStatus] = {
    **_POOLING_BASE, **_POOLING_CHAT, "input": H(), "use_activation": H(), "activation": H(),
}
SCORE: dict[str, FieldStatus] = {
    **_POOLING_BASE, "use_activation": H(), "activation": H(), "data_1": H(), "data_2": H(),
    "queries": H(), "documents": H(), "items": H(), "text_1": H(), "text_2": H(),
}
RERANK: dict[str, FieldStatus] = {
    **_POOLING_BASE, "use_activation": R("rerank scores are the model's own"), "query": H(),
    "documents": H(), "top_n": H(), "return_documents": H("Cohere / Jina"),
    "max_tokens_per_doc": H("Cohere v2"),
}

_FORM_ONLY = "the Whisper path decodes greedily with temperature fallback"
TRANSCRIPTION: dict[str, FieldStatus] = {
    "file": H(), "model": H(), "language": H(), "prompt": H(), "response_format": H(),
    "timestamp_granularities": H(), "timestamp_granularities[]": H(), "stream": H(),
    "temperature": H(),
    "stream_include_usage": R("streamed transcriptions end with the whole text only", False),
    "stream_continuous_usage_stats": R("streamed transcriptions carry no usage", False),
    "vllm_xargs": R("no custom logits-processor extensions", "{}"),
    "to_language": R("speech translation to other languages is not built; "
                     "/v1/audio/translations translates to English"),
    "hotwords": R("no hotword biasing"),
    "use_beam_search": R(_FORM_ONLY, False), "n": R(_FORM_ONLY, 1),
    "length_penalty": R(_FORM_ONLY, 1.0), "include_stop_str_in_output": R(_FORM_ONLY, False),
    "top_p": R(_FORM_ONLY, 1.0), "top_k": R(_FORM_ONLY, 0, -1), "min_p": R(_FORM_ONLY, 0.0),
    "seed": R(_FORM_ONLY), "frequency_penalty": R(_FORM_ONLY, 0.0),
    "repetition_penalty": R(_FORM_ONLY, 1.0), "presence_penalty": R(_FORM_ONLY, 0.0),
    "max_completion_tokens": R("a window's output is bounded by the model's own limit"),
}

ANTHROPIC: dict[str, FieldStatus] = {
    "model": H(), "messages": H(), "max_tokens": H(), "metadata": H("user_id -> user"),
    "output_config": H("effort -> reasoning_effort; format -> a JSON schema constraint"),
    "stop_sequences": H(), "stream": H(), "system": H(), "temperature": H(),
    "tool_choice": H(), "tools": H(), "top_k": H(), "top_p": H(),
    "thinking": H("enabled/adaptive/disabled -> enable_thinking; budget_tokens -> "
                  "thinking_token_budget"),
    "chat_template_kwargs": H("merged under thinking's enable_thinking"),
    "service_tier": I("one tier here"),
    "kv_transfer_params": R(_NO_DISAGG),
}
ANTHROPIC_COUNT: dict[str, FieldStatus] = {
    "model": H(), "messages": H(), "system": H(), "tool_choice": H(), "tools": H(),
    "thinking": H(), "chat_template_kwargs": H(),
}

# The inventory by fornax request struct (api/protocol), as Request.json and the audio form see it.
INVENTORY: dict[str, dict[str, FieldStatus]] = {
    "ChatCompletionRequest": CHAT,
    "CompletionRequest": COMPLETIONS,
    "ResponsesRequest": RESPONSES,
    "EmbeddingRequest": EMBEDDINGS,
    "PoolingRequest": POOLING,
    "ClassificationRequest": CLASSIFY,
    "ScoreRequest": SCORE,
    "RerankRequest": RERANK,
    "TranscriptionForm": TRANSCRIPTION,
    "MessagesRequest": ANTHROPIC,
    "CountTokensRequest": ANTHROPIC_COUNT,
}

# vLLM's own field names per struct, as its request models declare them (the test compares the
# inventory with this list; a new vLLM field goes here first, then gets a status above).
VLLM_FIELDS: dict[str, tuple[str, ...]] = {
    "ChatCompletionRequest": (
        "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
        "max_tokens", "max_completion_tokens", "n", "presence_penalty", "response_format",
        "seed", "stop", "stream", "stream_options", "temperature", "top_p", "tools",
        "tool_choice", "reasoning_effort", "thinking_token_budget", "include_reasoning",
        "parallel_tool_calls", "user", "use_beam_search", "top_k", "min_p",
        "repetition_penalty", "watermarking", "length_penalty", "stop_token_ids",
        "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
        "spaces_between_special_tokens", "truncate_prompt_tokens", "truncation_side",
        "prompt_logprobs", "logprob_token_ids", "allowed_token_ids", "bad_words", "echo",
        "add_generation_prompt", "continue_final_message", "add_special_tokens", "documents",
        "chat_template", "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs",
        "structured_outputs", "priority", "request_id", "session_id",
        "return_tokens_as_token_ids", "return_token_ids", "routed_experts_prompt_start",
        "return_token_offsets", "return_prompt_text", "return_mm_kwargs", "cache_salt",
        "kv_transfer_params", "ec_transfer_params", "vllm_xargs", "repetition_detection",
        "stream_interval",
        # 0.8-0.11
        "best_of", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "guided_decoding_backend", "guided_whitespace_pattern", "logits_processors",
        "early_stopping"),
    "CompletionRequest": (
        "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
        "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix",
        "temperature", "top_p", "user", "use_beam_search", "top_k", "min_p",
        "repetition_penalty", "watermarking", "length_penalty", "stop_token_ids",
        "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
        "spaces_between_special_tokens", "truncate_prompt_tokens", "truncation_side",
        "allowed_token_ids", "prompt_logprobs", "logprob_token_ids", "bad_words",
        "prompt_embeds", "add_special_tokens", "response_format", "structured_outputs",
        "priority", "request_id", "session_id", "return_tokens_as_token_ids",
        "return_token_ids", "routed_experts_prompt_start", "return_token_offsets",
        "return_mm_kwargs", "cache_salt", "kv_transfer_params", "ec_transfer_params",
        "vllm_xargs", "repetition_detection", "thinking_token_budget", "stream_interval",
        # 0.8-0.11
        "best_of", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "guided_decoding_backend", "guided_whitespace_pattern", "logits_processors",
        "early_stopping", "detokenize"),
    "ResponsesRequest": (
        "background", "include", "input", "instructions", "max_output_tokens", "max_tool_calls",
        "metadata", "model", "logit_bias", "parallel_tool_calls", "previous_response_id",
        "prompt", "reasoning", "service_tier", "store", "stream", "temperature", "text",
        "tool_choice", "tools", "top_logprobs", "top_p", "top_k", "truncation", "user",
        "skip_special_tokens", "include_stop_str_in_output", "prompt_cache_key", "request_id",
        "mm_processor_kwargs", "priority", "cache_salt", "enable_response_messages",
        "previous_input_messages", "previous_response", "structured_outputs",
        "repetition_penalty", "seed", "stop", "ignore_eos", "vllm_xargs"),
    "EmbeddingRequest": (
        "model", "user", "truncate_prompt_tokens", "padding", "truncation_side", "request_id",
        "priority", "mm_processor_kwargs", "cache_salt", "input", "add_special_tokens",
        "messages", "add_generation_prompt", "continue_final_message", "chat_template",
        "chat_template_kwargs", "media_io_kwargs", "encoding_format", "embed_dtype",
        "endianness", "dimensions", "use_activation", "normalize"),
    "PoolingRequest": (
        "model", "user", "truncate_prompt_tokens", "padding", "truncation_side", "request_id",
        "priority", "mm_processor_kwargs", "cache_salt", "input", "add_special_tokens",
        "messages", "add_generation_prompt", "continue_final_message", "chat_template",
        "chat_template_kwargs", "media_io_kwargs", "encoding_format", "embed_dtype",
        "endianness", "dimensions", "use_activation", "task"),
    "ClassificationRequest": (
        "model", "user", "truncate_prompt_tokens", "padding", "truncation_side", "request_id",
        "priority", "mm_processor_kwargs", "cache_salt", "input", "add_special_tokens",
        "messages", "add_generation_prompt", "continue_final_message", "chat_template",
        "chat_template_kwargs", "media_io_kwargs", "use_activation", "activation"),
    "ScoreRequest": (
        "model", "user", "truncate_prompt_tokens", "padding", "truncation_side", "request_id",
        "priority", "mm_processor_kwargs", "cache_salt", "use_activation", "data_1", "data_2",
        "queries", "documents", "items", "text_1", "text_2"),
    "RerankRequest": (
        "model", "user", "truncate_prompt_tokens", "padding", "truncation_side", "request_id",
        "priority", "mm_processor_kwargs", "cache_salt", "use_activation", "query",
        "documents", "top_n"),
    "TranscriptionForm": (
        "file", "model", "language", "hotwords", "prompt", "response_format",
        "timestamp_granularities[]", "stream", "stream_include_usage",
        "stream_continuous_usage_stats", "vllm_xargs", "to_language", "use_beam_search", "n",
        "length_penalty", "include_stop_str_in_output", "temperature", "top_p", "top_k",
        "min_p", "seed", "frequency_penalty", "repetition_penalty", "presence_penalty",
        "max_completion_tokens"),
    "MessagesRequest": (
        "model", "messages", "max_tokens", "metadata", "output_config", "stop_sequences",
        "stream", "system", "temperature", "tool_choice", "tools", "top_k", "top_p",
        "kv_transfer_params", "chat_template_kwargs", "thinking", "service_tier"),
    "CountTokensRequest": (
        "model", "messages", "system", "tool_choice", "tools", "chat_template_kwargs",
        "thinking"),
}


def counts() -> dict[str, dict[str, int]]:
    """Per struct: how many vLLM fields are honoured, ignored and rejected (README, reports)."""
    out: dict[str, dict[str, int]] = {}
    for name, table in INVENTORY.items():
        tally = {HONOURED: 0, IGNORED: 0, REJECTED: 0}
        for f in VLLM_FIELDS[name]:
            tally[table[f].status] += 1
        out[name] = tally
    return out
