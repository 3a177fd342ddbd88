"""The abort storm (streams cut at random points) and the overload burst (far more concurrent
requests than the queue bound) against a real server (fuzzer process)."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

from helpers.fuzzing.cases import API_KEY
from helpers.fuzzing.routes import GEN, MODEL_NAMES

HEADERS = {"authorization": f"Bearer {API_KEY}"}
WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "stars")


def _stream_body(rnd: random.Random) -> tuple[str, dict[str, Any]]:
    prompt = " ".join(rnd.choice(WORDS) for _ in range(rnd.choice((1, 8, 40, 100))))
    common = {"model": MODEL_NAMES[GEN], "max_tokens": rnd.choice((4, 16, 64, 120)),
              "n": rnd.choice((1, 1, 2, 4)), "stream": True, "ignore_eos": rnd.random() < 0.5,
              "temperature": rnd.choice((0.0, 1.0))}
    if rnd.random() < 0.5:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user",
                                                                 "content": prompt}]}
    return "/v1/completions", {**common, "prompt": prompt}


@dataclass
class StormResult:
    streams: int = 0
    cut: int = 0
    finished: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


async def _one_cut(client: httpx.AsyncClient, url: str, rnd: random.Random,
                   result: StormResult) -> None:
    path, body = _stream_body(rnd)
    cut_after = rnd.choice((0, 0, 1, 2, 3, 5, 10, 30, 1000))
    try:
        async with client.stream("POST", url + path, json=body, headers=HEADERS) as response:
            key = str(response.status_code)
            result.statuses[key] = result.statuses.get(key, 0) + 1
            if response.status_code >= 500 and not (response.status_code == 503 and
                                                    "retry-after" in response.headers):
                result.errors.append(f"{path} {response.status_code}: "
                                     f"{(await response.aread())[:300]!r}")
                return
            chunks = 0
            async for _ in response.aiter_raw():
                chunks += 1
                if chunks > cut_after:
                    result.cut += 1
                    return  # leaving the block closes the connection mid-stream
            result.finished += 1
    except httpx.HTTPError as exc:
        result.errors.append(f"{path}: {exc!r}")
    finally:
        result.streams += 1


async def abort_storm(url: str, streams: int, seed: int, concurrency: int = 16) -> StormResult:
    """`streams` streaming requests, each cut after a random number of chunks (some never)."""
    rnd = random.Random(seed)
    result = StormResult()
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, trust_env=False,
                                 limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        async def guarded(i: int) -> None:
            async with limit:
                await _one_cut(client, url, random.Random(rnd.getrandbits(64) + i), result)

        await asyncio.gather(*(guarded(i) for i in range(streams)))
    return result


@dataclass
class BurstResult:
    ok: int = 0
    overloaded: int = 0
    other: dict[str, int] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)  # admitted, but not finished properly


async def overload_burst(url: str, requests: int, max_tokens: int = 48) -> BurstResult:
    """`requests` concurrent completions at once: each finishes in full or gets 503 +
    Retry-After."""
    result = BurstResult()
    body = {"model": MODEL_NAMES[GEN], "prompt": "the cat sat", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0.0}
    async with httpx.AsyncClient(timeout=300, trust_env=False,
                                 limits=httpx.Limits(max_connections=requests)) as client:
        async def one() -> None:
            try:
                r = await client.post(url + "/v1/completions", json=body, headers=HEADERS)
            except httpx.HTTPError as exc:
                result.incomplete.append(repr(exc))
                return
            if r.status_code == 200:
                usage = r.json()["usage"]
                if usage["completion_tokens"] != max_tokens or \
                        r.json()["choices"][0]["finish_reason"] != "length":
                    result.incomplete.append(json.dumps(r.json())[:300])
                result.ok += 1
            elif r.status_code == 503 and "retry-after" in r.headers:
                result.overloaded += 1
            else:
                result.other[str(r.status_code)] = result.other.get(str(r.status_code), 0) + 1
                result.incomplete.append(f"{r.status_code}: {r.text[:300]}")

        await asyncio.gather(*(one() for _ in range(requests)))
    return result
