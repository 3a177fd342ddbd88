"""Hypothesis strategies of whole HTTP cases: a route, a server, a body (mutated seed, schema
value or malformed bytes), headers, streaming and client cuts (fuzzer process)."""

from __future__ import annotations

import io
import json
import random
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzzing.routes import ASR, MODEL_NAMES, TARGETS, Target
from fuzzing.values import (
    any_json,
    edge_ints,
    edge_text,
    from_schema,
    huge_string,
    struct_schema,
    struct_values,
)

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

    def describe(self) -> str:
        body = (self.body or b"")[:600]
        return (f"{self.target.method} {self.path} -> {self.server}; headers={self.headers}; "
                f"cut={self.cut_after} truncate={self.truncate}; body[:600]={body!r}")


# ---- JSON bodies ---------------------------------------------------------------------------
_SCHEMAS: dict[type, Any] = {}


def _schema(struct_type: type) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    if struct_type not in _SCHEMAS:
        schema, defs = struct_schema(struct_type)
        props = {name: from_schema(s, defs) for name, s in schema.get("properties", {}).items()}
        _SCHEMAS[struct_type] = (schema, defs, props)
    return _SCHEMAS[struct_type]


def _message_variants() -> st.SearchStrategy[Any]:
    role = st.one_of(st.sampled_from(("user", "assistant", "system", "tool", "developer",
                                      "function")), edge_text())
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": edge_text()}),
        st.fixed_dictionaries({"type": st.sampled_from(("image_url", "input_audio", "image",
                                                         "tool_result", "tool_use", "input_text",
                                                         "thinking", "document"))}),
        st.dictionaries(edge_text(), any_json(), max_size=3))
    content = st.one_of(edge_text(), st.lists(part, max_size=3), any_json())
    return st.one_of(
        st.fixed_dictionaries({"role": role, "content": content}),
        st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(),
                               "tool_calls": st.one_of(any_json(), st.just([{
                                   "id": "c1", "type": "function",
                                   "function": {"name": "f", "arguments": "{"}}]))}),
        any_json())


MESSAGE = _message_variants()


@st.composite
def mutated(draw: st.DrawFn, seed: dict[str, Any], target: Target) -> Any:
    """The seed with one to four mutations: schema fields set (mostly to extremes), fields
    dropped, unknown fields added, messages and inputs replaced."""
    body = json.loads(json.dumps(seed))
    props = _schema(target.struct)[2] if target.struct is not None else {}
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("field", "field", "field", "drop", "extra", "message",
                                   "ids", "model")))
        if op == "field" and props:
            name = draw(st.sampled_from(sorted(props)))
            body[name] = draw(props[name])
        elif op == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif op == "extra":
            body[draw(edge_text())] = draw(any_json())
        elif op == "message" and "messages" in body and isinstance(body["messages"], list):
            msgs = list(body["messages"])
            msgs[draw(st.integers(0, max(0, len(msgs) - 1)))] = draw(MESSAGE)
            if draw(st.booleans()):
                msgs.append(draw(MESSAGE))
            body["messages"] = msgs
        elif op == "ids":  # token ids where the route takes them
            ids = draw(st.lists(edge_ints(), min_size=0, max_size=6))
            key = draw(st.sampled_from(("prompt", "input", "tokens", "stop_token_ids",
                                        "allowed_token_ids")))
            body[key] = ids if draw(st.booleans()) else [ids]
        elif op == "model":
            body["model"] = draw(st.one_of(st.sampled_from(sorted(MODEL_NAMES.values())),
                                           edge_text()))
    return body


MALFORMED = (b"", b"{", b"}", b"[", b"null", b"[]", b"1", b"\"x\"", b"{\"a\":}", b"{'a': 1}",
             b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"{\"messages\": NaN}", b"{\"prompt\": \"\\ud800\"}",
             b"{\"prompt\": \"a\", \"prompt\": 1}", b"{\"max_tokens\": 1e999}",
             b"{\"max_tokens\": 18446744073709551616}", b"{\"n\": -0}", b"\x00" * 64,
             b"{\"a\": \"\xc3\x28\"}", b"{\"prompt\": \"\xed\xa0\x80\"}")


@st.composite
def malformed_json(draw: st.DrawFn, seed: dict[str, Any]) -> bytes:
    kind = draw(st.sampled_from(("fixed", "truncated", "garbage", "huge", "surrogate", "nan")))
    if kind == "fixed":
        return draw(st.sampled_from(MALFORMED))
    if kind == "truncated":
        text = json.dumps(seed).encode()
        return text[:draw(st.integers(0, max(0, len(text) - 1)))]
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    if kind == "huge":  # past the 1 MiB body limit, or just under it
        size = draw(st.sampled_from((1 << 20, (1 << 20) + 1, 3 << 20)))
        return json.dumps({**seed, "user": "a" * size}).encode()[:size + 64]
    if kind == "surrogate":  # a lone surrogate as raw (invalid) UTF-8
        return json.dumps({**seed, "prompt": "x\ud800y", "user": "\udfff"},
                          ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps({**seed, draw(st.sampled_from(sorted(seed) or ["x"])): float("nan")}
                      ).encode()


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


def audio_files() -> st.SearchStrategy[bytes]:
    if not _AUDIO:
        _AUDIO.update(tone=wav_bytes(), silence=wav_bytes(tone=False),
                      hi_rate=wav_bytes(0.05, 192000), low_rate=wav_bytes(0.5, 8000),
                      liar=lying_wav(192000, 2**31 - 64, 4096), tiny=lying_wav(16000, 2, 2),
                      empty=b"", garbage=bytes(range(256)) * 8, truncated=wav_bytes()[:100],
                      notwav=b"OggS" + b"\x00" * 200, flacish=b"fLaC" + b"\x00" * 100)
    return st.sampled_from(sorted(_AUDIO)).map(_AUDIO.__getitem__)


FORM_FIELDS = ("model", "language", "prompt", "temperature", "response_format",
               "timestamp_granularities[]", "stream", "x")
FORM_VALUES = ("json", "text", "srt", "vtt", "verbose_json", "word", "segment", "true", "false",
               "en", "de", "auto", "asr", "0.5", "-1", "nan", "1e308", "")


@st.composite
def multipart_body(draw: st.DrawFn) -> tuple[bytes, str]:
    parts: list[bytes] = []
    if draw(st.integers(0, 9)) > 0:
        name = draw(st.sampled_from(("a.wav", "a.flac", "", "x\r\ny.wav", "日本.wav")))
        parts.append(f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
                     f"Content-Type: audio/wav\r\n\r\n".encode("utf-8", "surrogatepass")
                     + draw(audio_files()))
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(FORM_FIELDS), edge_text()))
        value = draw(st.one_of(st.sampled_from(FORM_VALUES), edge_text()))
        parts.append(f'Content-Disposition: form-data; name="{key}"\r\n\r\n{value}'
                     .encode("utf-8", "surrogatepass"))
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    body += b"--" + BOUNDARY.encode() + b"--\r\n"
    kind = draw(st.sampled_from(("ok",) * 6 + ("no_end", "no_boundary", "junk")))
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    if kind == "no_end":
        body = body[:-len(BOUNDARY) - 8]
    elif kind == "no_boundary":
        ctype = "multipart/form-data"
    elif kind == "junk":
        body = draw(st.binary(max_size=300))
    return body, ctype


# ---- whole cases ---------------------------------------------------------------------------
CONTENT_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded",
                 "application/json; charset=latin-1", "multipart/form-data", "")


# Generation routes reach the engine's sampler and scheduler: they get the most cases.
WEIGHTS = {"chat": 8, "completions": 10, "responses": 4, "messages": 4, "chat_batch": 2,
           "invocations": 3, "embeddings": 3, "pooling": 2, "classify": 2, "v2_embed": 2,
           "audio_transcriptions": 4, "audio_translations": 2, "tokenize": 2, "detokenize": 2}


@st.composite
def case(draw: st.DrawFn, kinds: tuple[str, ...], response_ids: list[str]) -> Case:
    # structural choices with exact odds from a seeded Random; the values from hypothesis
    rnd = random.Random(draw(st.integers(0, 2**64 - 1)))
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
    path = target.path
    if "{id}" in path:
        fixed = ("resp_nope", "", "tiny", "asr", "%2e%2e", "a/b/c", "x" * 5000, "ü",
                 "resp_\u2028", "resp_%0d%0a")
        # the same draws whatever ids exist (hypothesis replays must see the same choices)
        use_id, pick, fallback = rnd.random() < 0.6, rnd.getrandbits(32), rnd.choice(fixed)
        ids = response_ids[-50:]
        path = path.replace("{id}", ids[pick % len(ids)] if ids and use_id else fallback)
    stream = False
    body: bytes | None = None
    if target.body == "json":
        seed = dict(rnd.choice(target.seeds)) if target.seeds else {}
        if rnd.random() < 0.7:
            seed["model"] = MODEL_NAMES[server]
        mode = rnd.choices(("seed", "mutate", "schema", "malformed"), (1, 6, 1.5, 1.5))[0]
        if target.struct is None and mode == "schema":
            mode = "mutate"
        value: Any = seed
        if mode == "mutate":
            value = draw(mutated(seed, target))
        elif mode == "schema":
            schema, defs, _ = _schema(target.struct)
            value = draw(struct_values(schema, defs))
        if target.streams and isinstance(value, dict) and rnd.random() < 0.4:
            value["stream"] = True
            if rnd.random() < 0.5:
                value["stream_options"] = {"include_usage": True,
                                           "continuous_usage_stats": rnd.random() < 0.5}
        stream = isinstance(value, dict) and value.get("stream") is True
        body = draw(malformed_json(seed)) if mode == "malformed" else \
            encode_json(value, rnd.random() < 0.5)
        ctype = "application/json" if rnd.random() < 0.9 else rnd.choice(CONTENT_TYPES)
        if ctype:
            headers["content-type"] = ctype
    elif target.body == "multipart":
        body, ctype = draw(multipart_body())
        headers["content-type"] = ctype
        stream = b'name="stream"\r\n\r\ntrue' in body
    elif rnd.random() < 0.1:  # a body on a route that takes none
        body = draw(st.binary(max_size=64))
    if rnd.random() < 0.04:
        headers["x-request-id"] = rnd.choice(("a" * 5000, "é", "a b", "id-1", ""))
    if rnd.random() < 0.03:  # fornax's per-request deadline
        headers["x-request-timeout"] = rnd.choice(("0.001", "0", "-1", "nan", "1e308", "abc",
                                                   "0.05", "2"))
    cut_after = rnd.randint(0, 6) if stream and rnd.random() < 0.25 else None
    truncate = body is not None and len(body) > 2 and rnd.random() < 0.02
    return Case(server, target, path, body, headers, stream, cut_after, truncate)


def huge_prompt_case(server: str, target: Target) -> st.SearchStrategy[Case]:
    """A valid request with a prompt far past the model's length (a long-input check)."""
    return huge_string().map(lambda text: Case(
        server, target, target.path, json.dumps({"prompt": text, "max_tokens": 4}).encode(),
        {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}))


__all__ = ["API_KEY", "ASR", "Case", "case", "huge_prompt_case", "wav_bytes"]
