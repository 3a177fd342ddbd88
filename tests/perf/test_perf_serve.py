"""`fornax bench serve` against a stub SSE server with known delays: TTFT/TPOT/ITL/E2E, goodput, schema."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fornax.perf.cli import main
from fornax.perf.schema import validate_record

TTFT_S = 0.12  # the stub waits this long before the first token
ITL_S = 0.03  # ... and this long between later tokens
NUM_TOKENS = 8


@dataclass
class StubServer:
    """A raw-asyncio OpenAI-ish server: /v1/models and streamed (completions|chat) with fixed
    delays. `usage=False` leaves out the usage chunk; `bodies` records what clients sent."""

    usage: bool = True
    tokens_per_chunk: int = 1
    fail_every: int = 0
    port: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    active: int = 0
    max_active: int = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "GET" and path == "/v1/models":
                payload = json.dumps({"object": "list", "data": [{"id": "stub-model"}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
                             + payload)
            else:
                await self._stream(json.loads(body), path, writer)
            await writer.drain()
        finally:
            writer.close()

    async def _stream(self, req: dict[str, Any], path: str, writer: asyncio.StreamWriter) -> None:
        self.bodies.append(req)
        if self.fail_every and len(self.bodies) % self.fail_every == 0:
            payload = b'{"error": {"message": "boom", "type": "server_error"}}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
                         + payload)
            return
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        chat = path.endswith("/chat/completions")
        n = int(req.get("max_completion_tokens") or req.get("max_tokens") or NUM_TOKENS)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n")
        await writer.drain()
        sent = 0
        await asyncio.sleep(TTFT_S)
        while sent < n:
            k = min(self.tokens_per_chunk, n - sent)
            text = "tok " * k
            choice = ({"index": 0, "delta": {"content": text}} if chat
                      else {"index": 0, "text": text})
            writer.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
            await writer.drain()
            sent += k
            if sent < n:
                await asyncio.sleep(ITL_S * self.tokens_per_chunk)
        if self.usage:
            usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}
            writer.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        writer.write(b"data: [DONE]\n\n")
        self.active -= 1

    def serve_forever(self, ready: threading.Event, stop: threading.Event) -> None:
        async def main_loop() -> None:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            server = await asyncio.start_server(self._handle, sock=sock)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)
            server.close()

        asyncio.run(main_loop())


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(ready, stop), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield server
    stop.set()
    thread.join(5)


def _run(stub: StubServer, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "serve.json"
    rc = main(["serve", "--base-url", f"http://127.0.0.1:{stub.port}", "--num-prompts", "6",
               "--input-len", "16", "--output-len", str(NUM_TOKENS), "--disable-tqdm",
               "--output-json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_serve_timings_match_known_delays(stub: StubServer, tmp_path: Path) -> None:
    rec = _run(stub, tmp_path, "--max-concurrency", "3", "--num-warmups", "1")
    assert validate_record(rec) == []
    m = rec["metrics"]
    assert m["completed"] == 6 and m["failed"] == 0
    assert m["total_output_tokens"] == 6 * NUM_TOKENS
    assert m["total_input_tokens"] == 6 * 5  # the server's usage wins over local estimates
    # known values, with room for scheduling jitter on a loaded 2-core machine
    assert TTFT_S * 1e3 <= m["median_ttft_ms"] <= TTFT_S * 1e3 + 40
    assert ITL_S * 1e3 - 3 <= m["median_itl_ms"] <= ITL_S * 1e3 + 25
    for what in ("ttft", "itl"):  # the percentiles guidellm and vLLM report, in order
        assert m[f"median_{what}_ms"] <= m[f"p95_{what}_ms"] <= m[f"p99_{what}_ms"]
    assert ITL_S * 1e3 - 3 <= m["median_tpot_ms"] <= ITL_S * 1e3 + 25
    expected_e2e = 1e3 * (TTFT_S + (NUM_TOKENS - 1) * ITL_S)
    assert expected_e2e <= m["median_e2el_ms"] <= expected_e2e + 60
    # 6 requests, 3 at a time: two waves of one E2E each
    assert 2 * expected_e2e / 1e3 <= m["duration_s"] <= 2 * expected_e2e / 1e3 + 0.4
    assert m["request_throughput"] == pytest.approx(6 / m["duration_s"])
    assert stub.max_active == 3
    assert rec["model"] == "stub-model"  # discovered through /v1/models
    assert rec["startup"]["num_warmups"] == 1 and len(stub.bodies) == 7
    body = stub.bodies[-1]
    assert body["stream"] is True and body["ignore_eos"] is True
    assert body["max_tokens"] == NUM_TOKENS and body["stream_options"] == {"include_usage": True}


def test_serve_chat_without_usage_counts_chunks(stub: StubServer, tmp_path: Path) -> None:
    stub.usage = False
    stub.tokens_per_chunk = 2  # each chunk carries two tokens: ITL doubles, counts are chunks
    rec = _run(stub, tmp_path, "--endpoint", "/v1/chat/completions", "--dataset",
               "synthetic-chat", "--num-warmups", "0")
    m = rec["metrics"]
    assert m["completed"] == 6
    assert m["total_output_tokens"] == 6 * NUM_TOKENS // 2
    assert abs(m["median_itl_ms"] - 2 * ITL_S * 1e3) <= 10
    assert stub.max_active == 6  # rate inf, no concurrency cap: all at once
    assert stub.bodies[0]["messages"][-1]["role"] == "user"
    assert stub.bodies[0]["max_completion_tokens"] == NUM_TOKENS


def test_serve_fixed_arrivals_and_goodput(stub: StubServer, tmp_path: Path) -> None:
    rate = 10.0
    rec = _run(stub, tmp_path, "--request-rate", str(rate), "--arrival", "fixed",
               "--num-warmups", "0", "--goodput", "ttft:1000", "e2el:5000")
    m = rec["metrics"]
    e2e = TTFT_S + (NUM_TOKENS - 1) * ITL_S
    # the last request leaves at 5/rate seconds and takes one E2E
    assert 5 / rate + e2e <= m["duration_s"] <= 5 / rate + e2e + 0.4
    assert m["good_requests"] == 6
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    strict = _run(stub, tmp_path, "--num-warmups", "0", "--goodput", f"ttft:{TTFT_S * 1e3 / 2}")
    assert strict["metrics"]["good_requests"] == 0


def test_arrival_schedules() -> None:
    from fornax.perf.serve_client import arrival_gaps

    poisson = arrival_gaps(4001, 20.0, 1.0, False, seed=3)
    mean = sum(poisson) / len(poisson)
    cv = (sum((g - mean) ** 2 for g in poisson) / len(poisson)) ** 0.5 / mean
    assert mean == pytest.approx(1 / 20.0, rel=0.06) and cv == pytest.approx(1.0, rel=0.08)
    assert poisson == arrival_gaps(4001, 20.0, 1.0, False, seed=3)  # seeded
    bursty = arrival_gaps(4001, 20.0, 0.25, False, seed=3)
    bmean = sum(bursty) / len(bursty)
    bcv = (sum((g - bmean) ** 2 for g in bursty) / len(bursty)) ** 0.5 / bmean
    assert bmean == pytest.approx(1 / 20.0, rel=0.1) and bcv == pytest.approx(2.0, rel=0.1)
    assert arrival_gaps(5, 4.0, 1.0, True, seed=0) == [0.25] * 4
    assert arrival_gaps(5, float("inf"), 1.0, False, seed=0) == [0.0] * 4


def test_serve_counts_failed_requests(stub: StubServer, tmp_path: Path) -> None:
    stub.fail_every = 3  # the stub answers HTTP 500 to every third request
    rec = _run(stub, tmp_path, "--num-warmups", "0")
    m = rec["metrics"]
    assert m["failed"] == 2 and m["completed"] == 4
    assert m["total_output_tokens"] == 4 * NUM_TOKENS
    assert any("HTTP 500" in e for e in rec["details"]["errors"])


def test_serve_unreachable_server_fails_loudly(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RuntimeError, match="warm-up request"):
        main(["serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "m",
              "--num-prompts", "2", "--disable-tqdm"])


@pytest.mark.slow
def test_serve_against_real_fornax_server(tmp_path: Path) -> None:
    """The same client against `fornax serve` (tiny model): exact lengths, both endpoints."""
    from helpers.api_server import ServerProcess, tiny_model_path

    model = str(tiny_model_path("llama"))
    server = ServerProcess(model, "--max-model-len", "256", "--served-model-name", "tiny",
                           "--seed", "0").wait_ready()
    try:
        for endpoint, dataset in (("/v1/completions", "random"),
                                  ("/v1/chat/completions", "synthetic-chat")):
            out = tmp_path / f"real{len(endpoint)}.json"
            rc = main(["serve", "--base-url", server.url, "--endpoint", endpoint,
                       "--dataset", dataset, "--tokenizer", model, "--num-prompts", "4",
                       "--input-len", "24", "--output-len", "6", "--max-concurrency", "2",
                       "--disable-tqdm", "--output-json", str(out)])
            assert rc == 0
            rec = json.loads(out.read_text())
            assert validate_record(rec) == []
            m = rec["metrics"]
            assert (m["completed"], m["failed"], m["total_output_tokens"]) == (4, 0, 24)
            assert rec["model"] == "tiny" and rec["details"]["output_len_mismatches"] == 0
            assert 0 < m["median_ttft_ms"] <= m["median_e2el_ms"]
    finally:
        server.stop()
