"""Life of `fornax serve`: disconnects, engine death, admission control, SIGTERM drain, CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from helpers.api_server import (
    REPO_ROOT,
    ServerProcess,
    auth,
    open_stream,
    post_concurrently,
    read_to_done,
    sse_events,
    tiny_model_path,
)

LONG = {"prompt": "Once upon a time", "ignore_eos": True, "temperature": 0}


def _gauge(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def _aborts(text: str) -> float:
    match = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$',
                      text, re.M)
    return float(match.group(1)) if match else 0.0


def test_disconnected_streams_are_aborted_and_free_their_kv_blocks(main_server):
    server = main_server
    http = httpx.Client(base_url=server.url, headers=auth(), timeout=30)
    aborts_before = _aborts(http.get("/metrics").text)
    body = {**LONG, "model": "tiny", "max_tokens": 490, "stream": True}
    socks = [open_stream(server.port, body) for _ in range(50)]
    during = http.get("/metrics").text
    assert _gauge(during, "vllm:num_requests_running") + \
        _gauge(during, "vllm:num_requests_waiting") > 0
    assert _gauge(during, "vllm:kv_cache_usage_perc") > 0
    for sock in socks:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    deadline = time.monotonic() + 15
    while True:
        text = http.get("/metrics").text
        idle = (_gauge(text, "vllm:num_requests_running") == 0
                and _gauge(text, "vllm:num_requests_waiting") == 0
                and _gauge(text, "vllm:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle, text
    assert _aborts(text) - aborts_before == 50
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.fixture(scope="module")
def no_template_model(tmp_path_factory):
    src = tiny_model_path("llama")
    dst = tmp_path_factory.mktemp("no-template")
    for f in src.iterdir():
        if f.name != "tokenizer_config.json":
            os.symlink(f, dst / f.name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.slow
def test_no_template_400_then_engine_death_gives_503_and_nonzero_exit(no_template_model):
    server = ServerProcess(str(no_template_model), "--served-model-name", "t",
                           env={"FORNAX_ENGINE_DEAD_GRACE_S": "3"}).wait_ready()
    try:
        http = httpx.Client(base_url=server.url, timeout=30)
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                 "content": "hi"}]})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        assert http.get("/health").status_code == 200
        sock = open_stream(server.port, {**LONG, "max_tokens": 1500, "stream": True}, key=None)
        os.kill(server.engine_pid(), signal.SIGKILL)
        text = read_to_done(sock).decode(errors="replace")
        text = re.sub(r"\r\n[0-9a-fA-F]+\r\n", "", "\r\n" + text)  # drop chunked framing
        events = sse_events(text)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == 503, events[-3:]
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == 503
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503
        assert server.proc.wait(timeout=30) != 0
        assert "engine core died" in server.log()
    finally:
        server.stop()


TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def options_server():
    server = ServerProcess(str(tiny_model_path("llama")), "--max-num-seqs", "1",
                           "--max-num-queued-requests", "1", "--shutdown-timeout", "30",
                           "--chat-template", TEMPLATE, "--trust-request-chat-template",
                           "--chat-template-content-format", "string",
                           "--disable-log-requests").wait_ready()
    yield server
    server.stop()


@pytest.mark.slow
def test_server_and_request_chat_templates(options_server):
    http = httpx.Client(base_url=options_server.url, timeout=30)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    ids = http.post("/tokenize", json={"messages": msgs}).json()["tokens"]
    text = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == "[user] hi\n[assistant] "
    own = http.post("/tokenize", json={"messages": msgs,
                                       "chat_template": "{{ messages[0]['content'] }}!"})
    assert http.post("/detokenize", json={"tokens": own.json()["tokens"]}).json()["prompt"] \
        == "hi!"
    slow = http.post("/v1/chat/completions", json={
        "messages": msgs, "chat_template": "{% for i in range(10**9) %}x{% endfor %}"})
    assert slow.status_code == 400 and slow.json()["error"]["param"] == "messages"
    assert http.get("/health").status_code == 200


@pytest.mark.slow
def test_queue_limit_answers_503_with_retry_after(options_server):
    results = [r for _, r in post_concurrently(options_server.url, 8, {**LONG, "max_tokens": 60})]
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 503 in codes, codes
    for r in results:
        if r.status_code == 503:
            assert r.headers["retry-after"].isdigit()
            assert "max-num-queued-reqs" in r.json()["error"]["message"]


@pytest.mark.slow
def test_sigterm_lets_inflight_requests_finish_and_exits_0(options_server):
    server = options_server
    sock = open_stream(server.port, {**LONG, "max_tokens": 1500, "stream": True}, key=None)
    server.proc.send_signal(signal.SIGTERM)
    assert b'"finish_reason":"length"' in read_to_done(sock)
    assert server.proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_sigterm_aborts_what_does_not_finish_within_the_timeout():
    server = ServerProcess(str(tiny_model_path("llama")), "--shutdown-timeout", "0.3",
                           "--max-num-seqs", "2").wait_ready()
    try:
        sock = open_stream(server.port, {**LONG, "max_tokens": 2000, "stream": True}, key=None)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert b'"finish_reason":"abort"' in read_to_done(sock)
        assert server.proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 15
    finally:
        server.stop()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fornax.api.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO_ROOT),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_unsupported_and_invalid_flags_fail_fast():
    model = str(tiny_model_path("llama"))
    for flags, expect in ((["--tool-call-parser", "nope"], "unknown tool-call parser"),
                          (["--enable-auto-tool-choice"], "requires --tool-call-parser"),
                          (["--reasoning-parser", "nope"], "unknown reasoning parser"),
                          (["--tool-parser-plugin", "/no/such.py"], "no such file"),
                          (["--block-size", "0"], "block_size"),
                          (["--prefill-itl-factor", "0.5"], "prefill_itl_factor"),
                          (["--long-prefill-token-threshold", "-1"],
                           "long_prefill_token_threshold"),
                          (["--chat-template", "/no/such/file"], "chat-template"),
                          (["--api-key", ""], "--api-key"),
                          (["--api-key", "k", " k2"], "--api-key"),
                          (["--ssl-keyfile", __file__], "needs --ssl-certfile too"),
                          (["--ssl-certfile", __file__], "needs --ssl-keyfile too"),
                          (["--ssl-keyfile", __file__, "--ssl-certfile", "/no/cert.pem"],
                           "--ssl-certfile /no/cert.pem: no such readable file")):
        started = time.monotonic()
        out = _cli("serve", model, "--port", "1", *flags)
        assert out.returncode == 2, (flags, out.stderr)
        assert expect in out.stderr, out.stderr
        assert time.monotonic() - started < 20
    out = _cli("serve", "/no/such/model", "--port", "1")
    assert out.returncode != 0 and "does not exist" in out.stderr


def test_help_documents_every_spec_flag():
    top = _cli("--help")
    assert top.returncode == 0 and "serve" in top.stdout
    text = _cli("serve", "--help").stdout
    flags = """--host --port --served-model-name --api-key --chat-template
    --chat-template-content-format --max-model-len --dtype --gpu-memory-utilization
    --kv-cache-memory --block-size --max-num-seqs --max-num-batched-tokens
    --enable-prefix-caching --no-enable-prefix-caching --enable-chunked-prefill --enforce-eager
    --cuda-graph-sizes --scheduling-policy --max-logprobs --enable-auto-tool-choice
    --tool-call-parser --reasoning-parser --generation-config --load-format --seed
    --tensor-parallel-size --api-server-count --max-num-queued-requests --allowed-origins --uds
    --disable-log-requests""".split()
    missing = [f for f in flags if f not in text]
    assert not missing


def test_port_in_use_fails_before_loading_the_model():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = _cli("serve", str(tiny_model_path("llama")), "--host", "127.0.0.1", "--port",
                   str(port))
    assert out.returncode == 1 and "in use" in out.stderr
    assert "starting the engine core" not in out.stderr
