"""Sends one fuzz case to its server and checks the per-case invariants: no 5xx but 503 with
Retry-After (and 501 where the model cannot serve the route), errors in the route's shape, also
inside streams (fuzzer process)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from helpers.fuzzing.cases import Case

TIMEOUT_S = 60.0
NO_RESPONSE = -1  # the client cut the connection on purpose, or sent a truncated body
TIMED_OUT = -2
BODY_LIMIT = 1 << 20  # the fleet's --max-request-body-bytes


@dataclass
class Outcome:
    status: int
    problem: str | None = None  # a broken invariant, in one line
    body: bytes = b""
    response_id: str | None = None


def allowed_5xx(case: Case, status: int, headers: httpx.Headers) -> str | None:
    """None when a 5xx answer is allowed, else why not."""
    if status == 503:
        return None if "retry-after" in headers else "503 without Retry-After"
    if status == 504 and "x-request-timeout" in case.headers:
        return None  # the deadline the client asked for passed
    if status == 501 and (case.server not in case.target.servers
                          or case.target.name == "invocations"):
        return None
    return f"HTTP {status}"


def error_shape_problem(path: str, body: Any) -> str | None:
    """None when `body` is the route's error shape: Anthropic's on /v1/messages, else OpenAI's."""
    if not isinstance(body, dict):
        return "the error body is not a JSON object"
    if path.startswith("/v1/messages"):
        err = body.get("error")
        if body.get("type") != "error" or not isinstance(err, dict) or \
                not isinstance(err.get("type"), str) or not isinstance(err.get("message"), str):
            return "not Anthropic's error shape"
        return None
    err = body.get("error")
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"} or \
            not isinstance(err["message"], str) or not isinstance(err["type"], str) or \
            not (err["param"] is None or isinstance(err["param"], str)):
        return "not OpenAI's error shape"
    return None


def stream_problem(case: Case, text: str) -> str | None:
    """A server error inside a 200 stream (an error event whose code says 5xx, not 503)."""
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            try:
                event = json.loads(line[6:])
            except ValueError:
                return f"a stream event is not JSON: {line[:200]!r}"
            if not isinstance(event, dict) or "error" not in event:
                continue
            if case.path.startswith("/v1/messages"):
                kind = (event.get("error") or {}).get("type")
                if kind == "api_error":
                    return f"an api_error event in the stream: {line[:300]}"
                continue
            err = event["error"]
            code = err.get("code") if isinstance(err, dict) else None
            if isinstance(code, int) and code >= 500 and code != 503:
                return f"a {code} error event in the stream: {line[:300]}"
            if isinstance(err, dict) and err.get("code") == "server_error":
                return f"a server_error event in the stream: {line[:300]}"
    return None


def body_problem(case: Case, status: int, headers: httpx.Headers, body: bytes) -> str | None:
    if status >= 500:
        bad = allowed_5xx(case, status, headers)
        if bad:
            return bad
    ctype = headers.get("content-type", "")
    if status >= 400:
        try:
            parsed = json.loads(body)
        except ValueError:
            return f"HTTP {status} with a non-JSON body ({ctype})"
        return error_shape_problem(case.path, parsed)
    if "text/event-stream" in ctype:
        return stream_problem(case, body.decode("utf-8", "replace"))
    if "application/json" in ctype:
        try:
            parsed = json.loads(body)
        except ValueError:
            return "a 200 whose JSON body does not parse"
        if isinstance(parsed, dict) and parsed.get("object") == "response" and \
                isinstance(parsed.get("error"), dict) and \
                parsed["error"].get("code") == "server_error":
            return f"a response that failed with a server error: {parsed['error']}"
    return None


async def send(client: httpx.AsyncClient, base_url: str, case: Case) -> Outcome:
    if case.delay_s:
        await asyncio.sleep(case.delay_s)
    if case.truncate:
        return await _send_truncated(base_url, case)
    headers = {k: v.encode("utf-8", "surrogatepass") for k, v in case.headers.items()}
    request = client.build_request(case.target.method, base_url + case.path, content=case.body,
                                   headers=headers)
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException:
        return Outcome(TIMED_OUT, f"no answer within {TIMEOUT_S:.0f} s")
    except httpx.HTTPError as exc:
        if len(case.body or b"") > BODY_LIMIT:  # refused (413) while the upload went on
            return Outcome(NO_RESPONSE)
        return Outcome(NO_RESPONSE, f"the connection failed: {exc!r}")
    chunks: list[bytes] = []
    try:
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
            if case.cut_after is not None and len(chunks) > case.cut_after \
                    and response.status_code == 200:
                return Outcome(NO_RESPONSE)  # the client goes away mid-stream
    except httpx.TimeoutException:
        return Outcome(TIMED_OUT, f"the body did not end within {TIMEOUT_S:.0f} s")
    except httpx.HTTPError as exc:
        return Outcome(response.status_code, f"the body broke off: {exc!r}")
    finally:
        await response.aclose()
    body = b"".join(chunks)
    problem = body_problem(case, response.status_code, response.headers, body)
    rid = None
    if case.target.name == "responses" and response.status_code == 200:
        rid = _response_id(body)
    return Outcome(response.status_code, problem, body, rid)


def _response_id(body: bytes) -> str | None:
    text = body.decode("utf-8", "replace")
    start = text.find('"id":"resp_')
    if start < 0:
        start = text.find('"id": "resp_')
    if start < 0:
        return None
    rest = text[text.index("resp_", start):]
    return rest[:rest.find('"')]


async def _send_truncated(base_url: str, case: Case) -> Outcome:
    """Announce the whole body, send part of it, then close: the server must shrug it off."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    body = case.body or b""
    head = [f"{case.target.method} {case.path} HTTP/1.1", f"host: {url.netloc}",
            f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in case.headers.items() if "\r" not in v and "\n" not in v]
    writer.write("\r\n".join(head).encode("utf-8", "surrogatepass") + b"\r\n\r\n")
    writer.write(body[:len(body) // 2])
    try:
        await writer.drain()
    except OSError:
        pass
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    del reader
    return Outcome(NO_RESPONSE)


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT_S, connect=10.0),
                             limits=httpx.Limits(max_connections=64), trust_env=False)
