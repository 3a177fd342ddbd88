"""Hypothesis strategies of whole HTTP cases: a route, a server, a body (mutated seed, schema
value or malformed bytes), headers, streaming and client cuts (fuzzer process)."""

from __future__ import annotations

import io
import itertools
import json
import random
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

from helpers.fuzzing.routes import ASR, MANY, MANY_MODELS, MODEL_NAMES, TARGETS, USER, Target
from helpers.fuzzing.values import POOLS, Pool, schema_value, struct_schema, struct_value

API_KEY = "fuzz-key"
BOUNDARY = "fuzzboundary7MA4YWxkTrZu0gW"


@dataclass
class Case:
    server: str  # the server kind it goes to
    target: Target
    path: str
    body: bytes | None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    cut_after: int | None = None  # close the connection after this many body chunks
    truncate: bool = False  # announce the whole body, send part of it, then close
    delay_s: float = 0.0  # sent this long after its batch-mates: lands beside their decodes

    def describe(self) -> str:
        body = (self.body or b"")[:600]
        return (f"{self.target.method} {self.path} -> {self.server}; headers={self.headers}; "
                f"cut={self.cut_after} truncate={self.truncate} delay={self.delay_s}; "
                f"body[:600]={body!r}")


# ---- JSON bodies ---------------------------------------------------------------------------
_SCHEMAS: dict[type, tuple[dict[str, Any], dict[str, Any]]] = {}


def _schema(struct_type: type) -> tuple[dict[str, Any], dict[str, Any]]:
    if struct_type not in _SCHEMAS:
        _SCHEMAS[struct_type] = struct_schema(struct_type)
    return _SCHEMAS[struct_type]


ROLES = ("user", "assistant", "system", "tool", "developer", "function")
PART_TYPES = ("text", "image_url", "input_audio", "image", "tool_result", "tool_use",
              "input_text", "thinking", "document", "file")


def message(rnd: random.Random, pool: Pool) -> Any:
    """A chat / Anthropic / Responses message, mostly well-formed, with edge content."""
    role = rnd.choice(ROLES) if rnd.random() < 0.85 else pool.text(rnd)
    shape = rnd.random()
    if shape < 0.45:
        return {"role": role, "content": pool.text(rnd)}
    if shape < 0.75:
        parts = []
        for _ in range(rnd.choice((0, 1, 2, 3))):
            kind = rnd.choice(PART_TYPES)
            part: dict[str, Any] = {"type": kind}
            if rnd.random() < 0.7:
                part[rnd.choice(("text", "image_url", "source", "input", "content"))] = \
                    pool.scalar(rnd)
            parts.append(part)
        return {"role": role, "content": parts}
    if shape < 0.85:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": pool.text(rnd), "type": "function", "function": {
                "name": pool.text(rnd), "arguments": rnd.choice(("{", "{}", "[]", "null"))}}]}
    return pool.json(rnd)


# The fields that reach the engine's sampler, scheduler and stop checks: set most often.
HOT_FIELDS = ("top_k", "top_p", "min_p", "temperature", "seed", "n", "best_of", "max_tokens",
              "min_tokens", "stop_token_ids", "allowed_token_ids", "bad_words", "logit_bias",
              "logprobs", "top_logprobs", "prompt_logprobs", "truncate_prompt_tokens", "priority",
              "repetition_penalty", "frequency_penalty", "presence_penalty", "length_penalty",
              "repetition_detection", "request_id", "stop", "max_completion_tokens",
              "use_beam_search", "ignore_eos", "guided_regex", "guided_choice", "guided_json",
              "response_format", "structured_outputs", "echo", "cache_salt",
              "thinking_token_budget", "truncation_side", "return_token_ids", "vllm_xargs",
              "reasoning_effort", "include_reasoning", "return_prompt_text")
GENERATION_TARGETS = frozenset({"chat", "completions", "chat_batch", "responses", "invocations",
                                "messages"})
_HOT: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
SERVED_NAMES = sorted({*MODEL_NAMES.values(), *MANY_MODELS})


def _hot_schema(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not _HOT:
        from fornax.api.protocol.openai import ChatCompletionRequest, CompletionRequest

        for struct_type in (ChatCompletionRequest, CompletionRequest):
            schema, defs = _schema(struct_type)
            for field_name, prop in schema["properties"].items():
                _HOT[field_name] = (prop, defs)
    return _HOT.get(name, ({}, {}))


def mutated(seed: dict[str, Any], target: Target, rnd: random.Random, pool: Pool) -> Any:
    """The seed with one to four mutations: engine-facing fields and other schema fields set
    (mostly to machine edges), fields dropped, unknown fields added, messages and ids replaced."""
    body = json.loads(json.dumps(seed))
    schema, defs = _schema(target.struct) if target.struct is not None else ({}, {})
    props = schema.get("properties", {})
    # one change to a valid body reaches deepest (a second one often makes it a plain 400)
    for _ in range(rnd.choice((1, 1, 1, 1, 2, 2, 3, 4))):
        op = rnd.choice(("hot", "hot", "hot", "field", "field", "drop", "extra", "message",
                         "ids", "model", "vllm"))
        if op == "hot" and target.name in GENERATION_TARGETS:
            name = rnd.choice(HOT_FIELDS)
            body[name] = schema_value(*_hot_schema(name), rnd, pool)
        elif op in ("field", "hot") and props:
            name = rnd.choice(sorted(props))
            body[name] = schema_value(props[name], defs, rnd, pool)
        elif op == "drop" and body:
            body.pop(rnd.choice(sorted(body)))
        elif op == "extra":
            body[pool.text(rnd)] = pool.json(rnd)
        elif op == "message" and isinstance(body.get("messages"), list):
            msgs = list(body["messages"])
            if msgs and isinstance(msgs[0], list):  # the batch route: a list of conversations
                msgs[rnd.randrange(len(msgs))] = [message(rnd, pool)]
            elif msgs:
                msgs[rnd.randrange(len(msgs))] = message(rnd, pool)
            if not msgs or rnd.random() < 0.5:
                msgs.append(message(rnd, pool))
            body["messages"] = msgs
        elif op == "ids":  # token ids where the route takes them
            ids = [pool.int(rnd) if rnd.random() < 0.5 else rnd.randint(0, 600)
                   for _ in range(rnd.choice((0, 1, 2, 3, 6)))]
            key = rnd.choice(("prompt", "input", "tokens", "stop_token_ids", "allowed_token_ids"))
            body[key] = ids if rnd.random() < 0.7 else [ids]
        elif op == "vllm":  # a vLLM field the struct does not declare (refused or ignored)
            body.update(vllm_field(target, rnd, pool))
        elif op == "model":
            body["model"] = rnd.choice(SERVED_NAMES) if rnd.random() < 0.5 \
                else pool.text(rnd)
            if rnd.random() < 0.3:  # the many-model router's field (api/server/model_set.py)
                body["keep_alive"] = keep_alive(rnd, pool)
    return body


def keep_alive(rnd: random.Random, pool: Pool) -> Any:
    """A request's keep_alive: valid durations (0 unloads the model after the request), edges."""
    return rnd.choice((pool.json(rnd), pool.int(rnd), "5m", "-1", 0, "0", "1s", 0.5, -1, "2h",
                       "1e9s", "", "m5"))


def vllm_field(target: Target, rnd: random.Random, pool: Pool) -> dict[str, Any]:
    """One of vLLM's fields of this route that fornax refuses or ignores (api/protocol/
    vllm_fields.py), or a nested one it checks itself (thinking, include, tools' strict)."""
    from fornax.api.protocol.vllm_fields import INVENTORY

    name = target.struct.__name__ if target.struct is not None else ""
    table = INVENTORY.get(name, {})
    declared = set(getattr(target.struct, "__struct_fields__", ()))
    extra = sorted(f for f in table if f not in declared)
    value = pool.json(rnd) if rnd.random() < 0.5 else rnd.choice((None, False, 0, 1, True, {}))
    if name == "MessagesRequest" and rnd.random() < 0.5:
        return {"thinking": {"type": rnd.choice(("enabled", "adaptive", "disabled", "x")),
                             "budget_tokens": pool.int(rnd) if rnd.random() < 0.8 else value}}
    if name == "ResponsesRequest" and rnd.random() < 0.5:
        return {"include": [rnd.choice(("message.output_text.logprobs",
                                        "reasoning.encrypted_content", pool.small_text(rnd)))],
                "top_logprobs": pool.int(rnd), "max_tool_calls": pool.int(rnd),
                "truncation": rnd.choice(("auto", "disabled", pool.small_text(rnd)))}
    if name == "ChatCompletionRequest" and rnd.random() < 0.3:
        return {"tools": [{"type": "function", "function": {
            "name": "f", "strict": value, "parameters": {"type": "object"}}}],
            "tool_choice": rnd.choice(("required", "auto", "none"))}
    return {rnd.choice(extra): value} if extra else {}


MALFORMED = (b"", b"{", b"}", b"[", b"null", b"[]", b"1", b"\"x\"", b"{\"a\":}", b"{'a': 1}",
             b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"{\"messages\": NaN}", b"{\"prompt\": \"\\ud800\"}",
             b"{\"prompt\": \"a\", \"prompt\": 1}", b"{\"max_tokens\": 1e999}",
             b"{\"max_tokens\": 18446744073709551616}", b"{\"n\": -0}", b"\x00" * 64,
             b"{\"a\": \"\xc3\x28\"}", b"{\"prompt\": \"\xed\xa0\x80\"}")


def malformed_json(seed: dict[str, Any], rnd: random.Random, pool: Pool) -> bytes:
    kind = rnd.choice(("fixed", "truncated", "garbage", "huge", "surrogate", "nan"))
    if kind == "fixed":
        return rnd.choice(MALFORMED)
    if kind == "truncated":
        text = json.dumps(seed).encode()
        return text[:rnd.randrange(max(1, len(text)))]
    if kind == "garbage":
        return rnd.choice(pool.blobs)
    if kind == "huge":  # past the 1 MiB body limit, or just under it
        size = rnd.choice((1 << 20, (1 << 20) + 1, 3 << 20, (1 << 20) - 200))
        return json.dumps({**seed, "user": "a" * size}).encode()[:size + 64]
    if kind == "surrogate":  # a lone surrogate as raw (invalid) UTF-8
        return json.dumps({**seed, "prompt": "x\ud800y", "user": "\udfff"},
                          ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps({**seed, rnd.choice(sorted(seed) or ["x"]): float("nan")}).encode()


def encode_json(value: Any, ascii_only: bool) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    except (RecursionError, ValueError):  # deeper than json.dumps goes: build the text by hand
        return _encode_deep(value).encode("utf-8", "surrogatepass")


def _encode_deep(value: Any) -> str:
    opens, inner = [], value
    while isinstance(inner, (list, dict)) and inner:
        if isinstance(inner, list):
            opens.append("[")
            inner = inner[0]
        else:
            key = next(iter(inner))
            opens.append("{" + json.dumps(key) + ":")
            inner = inner[key]
    closes = ["]" if o == "[" else "}" for o in reversed(opens)]
    return "".join(opens) + json.dumps(inner) + "".join(closes)


# ---- multipart audio -----------------------------------------------------------------------
def wav_bytes(seconds: float = 0.5, rate: int = 16000, tone: bool = True) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) if tone else np.zeros_like(t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue()


def lying_wav(rate: int, claimed_bytes: int, real_bytes: int) -> bytes:
    """A PCM16 WAV header that claims `claimed_bytes` of data at `rate` Hz, with fewer."""
    header = b"RIFF" + struct.pack("<I", 36 + claimed_bytes) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", claimed_bytes)
    return header + b"\x01\x00" * (real_bytes // 2)


_AUDIO: dict[str, bytes] = {}


def audio_file(rnd: random.Random) -> bytes:
    if not _AUDIO:
        _AUDIO.update(tone=wav_bytes(), silence=wav_bytes(tone=False),
                      hi_rate=wav_bytes(0.05, 192000), low_rate=wav_bytes(0.5, 8000),
                      liar=lying_wav(192000, 2**31 - 64, 4096), tiny=lying_wav(16000, 2, 2),
                      empty=b"", garbage=bytes(range(256)) * 8, truncated=wav_bytes()[:100],
                      notwav=b"OggS" + b"\x00" * 200, flacish=b"fLaC" + b"\x00" * 100)
    return _AUDIO[rnd.choice(sorted(_AUDIO))]


FORM_FIELDS = ("model", "language", "prompt", "temperature", "response_format",
               "timestamp_granularities[]", "stream", "x", "vllm_xargs", "top_p", "n", "seed",
               "hotwords", "to_language", "stream_include_usage", "use_beam_search",
               "keep_alive")  # keep_alive: the many-model router reads it from the form too
FORM_VALUES = ("json", "text", "srt", "vtt", "verbose_json", "word", "segment", "true", "false",
               "en", "de", "auto", "asr", "0.5", "-1", "nan", "1e308", "", "5m", "0s")


def multipart_body(rnd: random.Random, pool: Pool) -> tuple[bytes, str]:
    parts: list[bytes] = []
    if rnd.random() < 0.9:
        name = rnd.choice(("a.wav", "a.flac", "", "x\r\ny.wav", "日本.wav"))
        parts.append(f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
                     f"Content-Type: audio/wav\r\n\r\n".encode("utf-8", "surrogatepass")
                     + audio_file(rnd))
    for _ in range(rnd.choice((0, 1, 2, 3, 4))):
        key = rnd.choice(FORM_FIELDS) if rnd.random() < 0.85 else pool.text(rnd)
        value = rnd.choice(FORM_VALUES) if rnd.random() < 0.7 else pool.text(rnd)
        parts.append(f'Content-Disposition: form-data; name="{key}"\r\n\r\n{value}'
                     .encode("utf-8", "surrogatepass"))
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    body += b"--" + BOUNDARY.encode() + b"--\r\n"
    kind = rnd.choice(("ok",) * 6 + ("no_end", "no_boundary", "junk"))
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    if kind == "no_end":
        body = body[:-len(BOUNDARY) - 8]
    elif kind == "no_boundary":
        ctype = "multipart/form-data"
    elif kind == "junk":
        body = rnd.choice(pool.blobs)
    return body, ctype


# ---- whole cases ---------------------------------------------------------------------------
CONTENT_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded",
                 "application/json; charset=latin-1", "multipart/form-data", "")
# Generation routes reach the engine's sampler and scheduler: they get the most cases.
WEIGHTS = {"chat": 8, "completions": 10, "responses": 4, "messages": 4, "chat_batch": 2,
           "invocations": 3, "embeddings": 3, "pooling": 2, "classify": 2, "v2_embed": 2,
           "audio_transcriptions": 4, "audio_translations": 2, "tokenize": 2, "detokenize": 2}
# Bodies whose prompt lands in a mixed step (a prompt chunk beside other streams' decodes, the
# fused CPU call's token rows): long decodes to ride beside, and constrained, n>1, logprob and
# prompt-logprob requests with prompts of a few chunks' length, sent a little after them.
_LONG_TEXT = " ".join(f"word{i} is here" for i in range(24))
_LONG_IDS = [(7 * i) % 250 + 3 for i in range(90)]
MIXED_SEEDS: dict[str, tuple[dict[str, Any], ...]] = {
    "chat": (
        {"messages": USER, "max_tokens": 64, "stream": True, "ignore_eos": True},
        {"messages": [{"role": "user", "content": _LONG_TEXT}], "max_tokens": 12,
         "response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": _LONG_TEXT}], "max_tokens": 8,
         "guided_choice": ["yes", "no"], "n": 2},
        {"messages": [{"role": "user", "content": _LONG_TEXT}], "max_tokens": 10,
         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
             "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
         "logprobs": True, "top_logprobs": 2},
    ),
    "completions": (
        {"prompt": "hi", "max_tokens": 64, "stream": True, "ignore_eos": True},
        {"prompt": [5, 6, 7], "max_tokens": 48, "ignore_eos": True, "n": 3, "temperature": 1.0},
        {"prompt": _LONG_IDS, "max_tokens": 8, "guided_regex": "[a-z]{1,6}",
         "prompt_logprobs": 2},
        {"prompt": _LONG_TEXT, "max_tokens": 6, "prompt_logprobs": 1, "logprobs": 1, "n": 2,
         "echo": True},
        {"prompt": _LONG_IDS[:40], "max_tokens": 8, "guided_json": {"type": "object"},
         "seed": 3, "temperature": 0.7},
    ),
}
# (no value with whitespace at either end: the client library refuses those itself)
AUTH_EDGES = ("", "Bearer", f"Bearer  {API_KEY}", f"bearer {API_KEY}", f"Bearer {API_KEY},x",
              f"Bearer {API_KEY},{API_KEY}", f"Basic {API_KEY}", f"Bearer {API_KEY}\u00e9",
              "Bearer fuzz-k\u00e9y", "Bearer \u00ff", API_KEY, f"Bearer {API_KEY[:-1]}",
              "Bearer " + "k" * 5000, "Bearer \udcff")
_RUNNING = itertools.count()  # mixed into each case's Random: hypothesis repeats its draws a lot


def restart_count() -> None:
    global _RUNNING
    _RUNNING = itertools.count()


@st.composite
def case(draw: st.DrawFn, kinds: tuple[str, ...], response_ids: list[str]) -> Case:
    """One case: hypothesis draws a pool of values (always the same shape); a Random seeded
    from it and a running count picks the route, server, mutations and headers."""
    pool = draw(POOLS)
    return build_case(random.Random(pool.seed * 1_000_003 + next(_RUNNING)), pool, kinds,
                      response_ids)


def build_case(rnd: random.Random, pool: Pool, kinds: tuple[str, ...],
               response_ids: list[str]) -> Case:
    targets = [t for t in TARGETS if t.body != "multipart" or ASR in kinds]
    target = rnd.choices(targets, [WEIGHTS.get(t.name, 1) for t in targets])[0]
    home = [k for k in kinds if k in target.servers]
    server = rnd.choice(home) if home and rnd.random() < 0.85 else rnd.choice(kinds)
    headers = {"authorization": f"Bearer {API_KEY}"}
    auth = rnd.random()
    if auth < 0.03:
        headers.pop("authorization")
    elif auth < 0.06:
        headers = {"x-api-key": API_KEY} if target.anthropic_errors else {
            "authorization": "Bearer wrong"}
    elif auth < 0.08:  # the key rule's edges (api/server/api_keys.py): 401, never a 500
        headers = {rnd.choice(("authorization", "x-api-key")): rnd.choice(AUTH_EDGES)}
    path = target.path
    if "{id}" in path:
        fixed = ("resp_nope", "", "tiny", "asr", "%2e%2e", "a/b/c", "x" * 5000, "ü",
                 "resp_\u2028", "resp_%0d%0a")
        ids = response_ids[-50:]
        if target.name.startswith("model"):  # /v1/models/{id}[/load|/unload]: mostly served
            ids = list(MANY_MODELS if server == MANY else (MODEL_NAMES[server],))
        path = path.replace("{id}", rnd.choice(ids) if ids and rnd.random() < 0.6 else
                            rnd.choice(fixed))
    stream = False
    body: bytes | None = None
    if target.body == "json":
        seed = dict(rnd.choice(target.seeds)) if target.seeds else {}
        if target.name in ("chat", "completions") and rnd.random() < 0.25:
            seed = dict(rnd.choice(MIXED_SEEDS[target.name]))
        if rnd.random() < 0.7:
            seed["model"] = rnd.choice(MANY_MODELS) if server == MANY else MODEL_NAMES[server]
            if server == MANY and rnd.random() < 0.3:  # unload after it, stay, or a while
                seed["keep_alive"] = keep_alive(rnd, pool)
        mode = rnd.choices(("seed", "mutate", "schema", "malformed"), (1, 6, 1.5, 1.5))[0]
        if target.struct is None and mode == "schema":
            mode = "mutate"
        value: Any = seed
        if mode == "mutate":
            value = mutated(seed, target, rnd, pool)
        elif mode == "schema":
            value = struct_value(*_schema(target.struct), rnd, pool)
        if target.streams and isinstance(value, dict) and rnd.random() < 0.4:
            value["stream"] = True
            if rnd.random() < 0.5:
                value["stream_options"] = {"include_usage": True,
                                           "continuous_usage_stats": rnd.random() < 0.5}
        stream = isinstance(value, dict) and value.get("stream") is True
        body = malformed_json(seed, rnd, pool) if mode == "malformed" else \
            encode_json(value, rnd.random() < 0.5)
        ctype = "application/json" if rnd.random() < 0.9 else rnd.choice(CONTENT_TYPES)
        if ctype:
            headers["content-type"] = ctype
    elif target.body == "multipart":
        body, ctype = multipart_body(rnd, pool)
        headers["content-type"] = ctype
        stream = b'name="stream"\r\n\r\ntrue' in body
    elif rnd.random() < 0.1:  # a body on a route that takes none
        body = rnd.choice(pool.blobs)
    if rnd.random() < 0.04:
        headers["x-request-id"] = rnd.choice(("a" * 5000, "é", "a b", "id-1", ""))
    if rnd.random() < 0.03:  # fornax's per-request deadline
        headers["x-request-timeout"] = rnd.choice(("0.001", "0", "-1", "nan", "1e308", "abc",
                                                   "0.05", "2"))
    cut_after = rnd.randint(0, 6) if stream and rnd.random() < 0.25 else None
    truncate = body is not None and len(body) > 2 and rnd.random() < 0.02
    delay = 0.0
    # arrives while others decode, or (POST load/unload) while a model loads or wakes
    if (target.name in GENERATION_TARGETS or target.name in ("model_load", "model_unload")) \
            and rnd.random() < 0.3:
        delay = rnd.choice((0.02, 0.05, 0.1, 0.2, 0.4))
    return Case(server, target, path, body, headers, stream, cut_after, truncate, delay)
