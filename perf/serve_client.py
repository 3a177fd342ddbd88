"""Streaming OpenAI-compatible client for `bench serve`: one request, timed per SSE chunk (CLI process)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fornax.perf.datasets import BenchRequest

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class RequestResult:
    """What one streamed request measured (times in seconds, from `time.perf_counter`)."""

    success: bool = False
    start: float = 0.0
    ttft: float = 0.0  # request sent -> first chunk that carried generated text
    itl: list[float] = field(default_factory=list)  # gaps between later text chunks
    latency: float = 0.0  # request sent -> end of stream
    output_tokens: int = 0  # usage.completion_tokens, else the number of text chunks
    prompt_tokens: int | None = None  # usage.prompt_tokens when the server reports it
    num_chunks: int = 0
    expected_output_len: int = 0
    usage_reported: bool = False
    error: str = ""
    text: str = ""

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for 1-token outputs)."""
        if self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def build_payload(endpoint: str, model: str, req: BenchRequest, *, ignore_eos: bool,
                  temperature: float, use_token_ids: bool,
                  extra_body: dict[str, Any] | None) -> dict[str, Any]:
    """The request body: vLLM's bench shape (stream with usage, `ignore_eos` as an extra)."""
    body: dict[str, Any] = {"model": model, "stream": True, "temperature": temperature,
                            "stream_options": {"include_usage": True}}
    if endpoint.endswith("/chat/completions"):
        messages = req.messages or [{"role": "user", "content": req.prompt or ""}]
        body["messages"] = messages
        body["max_completion_tokens"] = req.output_len
    else:
        if use_token_ids and req.prompt_token_ids is not None:
            body["prompt"] = req.prompt_token_ids
        else:
            body["prompt"] = req.prompt if req.prompt is not None else ""
        body["max_tokens"] = req.output_len
    if ignore_eos:
        body["ignore_eos"] = True
    if extra_body:
        body.update(extra_body)
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


async def send_request(client: Any, url: str, body: dict[str, Any], req: BenchRequest,
                       headers: dict[str, str] | None = None) -> RequestResult:
    """POST `body` with streaming and time every chunk that carries text."""
    result = RequestResult(expected_output_len=req.output_len)
    start = time.perf_counter()
    result.start = start
    last = start
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:300]
                result.error = f"HTTP {response.status_code}: {detail}"
                return result
            async for line in response.aiter_lines():
                line = line.strip()
                if not line or line.startswith(":") or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk and not chunk.get("choices"):
                    result.error = str(chunk["error"])[:300]
                    return result
                text = _chunk_text(chunk)
                if text:
                    if result.num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.num_chunks += 1
                    parts.append(text)
                usage = chunk.get("usage")
                if usage:
                    result.usage_reported = True
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
        result.latency = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - any transport error is one failed request
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if not result.usage_reported:
        result.output_tokens = result.num_chunks
    result.text = "".join(parts)
    result.success = result.num_chunks > 0 or result.output_tokens > 0
    if not result.success:
        result.error = "the stream carried no generated text"
    return result


def arrival_gaps(n: int, rate: float, burstiness: float, fixed: bool, seed: int) -> list[float]:
    """Seconds to wait after each of the first n-1 requests: 0 (rate inf), 1/rate (fixed), or
    gamma-distributed with mean 1/rate (shape = burstiness: 1 is Poisson, lower is burstier)."""
    if rate == float("inf"):
        return [0.0] * max(n - 1, 0)
    if fixed:
        return [1.0 / rate] * max(n - 1, 0)
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n - 1)]


async def arrivals(n: int, rate: float, burstiness: float, fixed: bool,
                   seed: int) -> AsyncIterator[int]:
    """Yield request indices on the schedule of `arrival_gaps`."""
    gaps = arrival_gaps(n, rate, burstiness, fixed, seed)
    for i in range(n):
        yield i
        if i < n - 1 and gaps[i] > 0:
            await asyncio.sleep(gaps[i])


async def run_load(client: Any, url: str, bodies: list[dict[str, Any]],
                   requests: list[BenchRequest], *, rate: float, burstiness: float, fixed: bool,
                   max_concurrency: int | None, seed: int, headers: dict[str, str] | None,
                   bar: Any) -> tuple[list[RequestResult], float, float]:
    """Send every request on its arrival schedule; returns (results in order, start, end)."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(i: int) -> RequestResult:
        if limit is None:
            res = await send_request(client, url, bodies[i], requests[i], headers)
        else:
            async with limit:
                res = await send_request(client, url, bodies[i], requests[i], headers)
        bar.update(1)
        return res

    tasks: list[asyncio.Task[RequestResult]] = []
    start = time.perf_counter()
    async for i in arrivals(len(bodies), rate, burstiness, fixed, seed):
        tasks.append(asyncio.create_task(one(i)))
    results = list(await asyncio.gather(*tasks))
    return results, start, time.perf_counter()
