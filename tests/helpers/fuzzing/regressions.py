"""Every distinct failure the campaign has found, as a fixed case: each must keep every invariant
(the fuzzer process; see /work/fuzz_findings.md for where each came from)."""

from __future__ import annotations

import json
from typing import Any

from helpers.fuzzing.cases import API_KEY, Case
from helpers.fuzzing.routes import EMBED, GEN, TARGETS

_BY_NAME = {t.name: t for t in TARGETS}
DEEP = "[" * 20000 + "]" * 20000
BAD_UTF8 = (b'{"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "input": "hi", '
            b'"prompt": "hi", "user": "\xc3("}')

# a refused vLLM field (api/protocol/fields.py) holding an encoded surrogate: the struct skips it
BAD_FIELD = (b'{"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "input": "hi", '
             b'"prompt": "hi", "kv_transfer_params": [null, "\xed\xa0\x80"]}')


def _case(server: str, route: str, body: Any, **headers: str) -> Case:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(server, _BY_NAME[route], _BY_NAME[route].path, raw,
                {"authorization": f"Bearer {API_KEY}", "content-type": "application/json",
                 **headers})


def regression_cases() -> list[tuple[str, Case]]:
    """(what it once did, the case)."""
    hi = [{"role": "user", "content": "hi"}]
    return [
        ("engine death: IndexError in the min_tokens stop mask", _case(GEN, "completions", {
            "prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [1000000000]})),
        ("engine death: top_k overflows int32", _case(GEN, "completions", {
            "prompt": "hi", "max_tokens": 4, "temperature": 1.0, "top_k": 2147483648})),
        ("engine death: top_k 2^32 with n=2", _case(GEN, "chat", {
            "messages": hi, "max_tokens": 4, "n": 2, "temperature": 0.8, "top_k": 4294967296,
            "seed": 1})),
        ("engine death: a 64-bit seed", _case(GEN, "completions", {
            "prompt": "hi", "max_tokens": 2, "seed": 2**63})),
        ("500: logit_bias key that int() reads", _case(GEN, "completions", {
            "prompt": "hi", "max_tokens": 2, "logit_bias": {"²": 5}})),
        *[(f"500: request_id {rid!r} in the x-request-id header", _case(GEN, "completions", {
            "prompt": "hi", "max_tokens": 2, "request_id": rid}))
          for rid in ("a\r\nb", "a\u2028b", "ñr6\U0008fe3e")],
        ("500: RecursionError on deep JSON (batch)", _case(GEN, "chat_batch",
                                                          f'{{"messages": {DEEP}}}'.encode())),
        ("500: RecursionError on deep JSON (invocations)", _case(GEN, "invocations",
                                                                f'{{"x": {DEEP}}}'.encode())),
        *[(f"500: invalid UTF-8 in the body of {route}", _case(GEN, route, BAD_UTF8))
          for route in ("messages", "responses", "chat", "completions")],
        ("500: invalid UTF-8 in an embeddings body", _case(EMBED, "embeddings",
                                                          b'{"input": "a", "user": "\xed\xa0\x80"}')),
        ("500: Number out of range in /v1/responses", _case(GEN, "responses",
                                                           b'{"input": "hi", "max_tokens": 1e999}')),
        *[(f"500: invalid UTF-8 in a refused vLLM field of {route}", _case(GEN, route, BAD_FIELD))
          for route in ("messages", "chat", "completions", "responses")],
    ]
