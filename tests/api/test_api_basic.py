"""API tests on a real `fornax serve` (tiny llama): models, chat, completions, tokenize, metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import openai
import pytest

from helpers.api_server import API_KEYS, auth, tiny_model_path


@pytest.fixture(scope="module")
def server(main_server):
    return main_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEYS[0], max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=auth(), timeout=60) as c:
        yield c


CHAT = [{"role": "user", "content": "Tell me a story about the sea."}]


def test_import_app_does_not_import_torch():
    code = "import sys, fornax.api.server.app; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_models_list_aliases_and_lookup(client, http):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "tiny-alias"]
    for m in models:
        assert m.owned_by == "fornax"
        assert m.model_extra["max_model_len"] == 512
        assert m.model_extra["root"] == str(tiny_model_path("llama"))
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    by_path = http.get("/v1/models/" + str(tiny_model_path("llama")))
    assert by_path.status_code == 200 and by_path.json()["max_model_len"] == 512
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_chat_stream_equals_non_stream_with_seed(client):
    kwargs = dict(model="tiny", messages=CHAT, max_tokens=24, temperature=1.0, seed=1234)
    full = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert full.choices[0].message.content == again.choices[0].message.content
    chunks = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens)
    assert full.usage.completion_tokens <= 24
    # the same prompt a third time: its full blocks come from the prefix cache
    block = 16
    assert usage.prompt_tokens_details.cached_tokens == \
        (full.usage.prompt_tokens - 1) // block * block


def test_completions_stream_continuous_usage(client):
    kwargs = dict(model="tiny-alias", prompt="Once upon a time", max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(
        **kwargs, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 12
    assert all(c.usage.prompt_tokens == full.usage.prompt_tokens for c in chunks)


@pytest.mark.parametrize("path, body, kind", [
    ("/v1/chat/completions", {"messages": CHAT}, "chat.completion.chunk"),
    ("/v1/completions", {"prompt": "Once upon a time"}, "text_completion"),
])
def test_every_stream_chunk_names_its_object(http, client, path, body, kind):
    # OpenAI and vLLM send `object` on every chunk, the usage chunk included; clients that
    # dispatch on it (LangChain, LiteLLM, Go and Rust SDKs) saw none.
    body = {"model": "tiny", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}, **body}
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == [kind] * len(chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    create = client.chat.completions if "messages" in body else client.completions
    del body["stream_options"]
    assert {c.object for c in create.create(**body)} == {kind}  # the openai client's view


def test_n3_choices_streamed_and_not(client):
    kwargs = dict(model="tiny", prompt="The inference server", max_tokens=10, n=3,
                  temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert sorted(c.index for c in full.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(full.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice samples on its own
    assert full.usage.completion_tokens == 30
    streamed = ["", "", ""]
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, n=3)
    assert len(chat.choices) == 3


def _greedy_text(client, prompt: str, max_tokens: int = 30) -> str:
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, extra_body={"ignore_eos": True}
                                     ).choices[0].text


def test_stop_string_cuts_text_and_reports_stop_reason(client):
    text = _greedy_text(client, "Every morning he walked down to the harbour")
    k = next(k for k in range(4, len(text) - 3)
             if "\ufffd" not in text[k:k + 3] and text.find(text[k:k + 3]) == k)
    stop = text[k:k + 3]
    kwargs = dict(model="tiny", prompt="Every morning he walked down to the harbour",
                  max_tokens=30, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    out = client.completions.create(**kwargs)
    assert out.choices[0].text == text[:k]
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == text[:k]


def test_token_id_prompts_echo_and_batches(client, http):
    prompt = "Hello! How are you today?"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    by_text = _greedy_text(client, prompt, 8)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == by_text
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                       echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == prompt + by_text
    batch = client.completions.create(model="tiny", prompt=[prompt, "Numbers: 1 2 3"],
                                      max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    id_batch = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=4,
                                         temperature=0)
    assert len(id_batch.choices) == 2
    assert id_batch.usage.prompt_tokens == len(ids) + 3


def test_max_tokens_clamped_to_context_left(client, http):
    ids = http.post("/tokenize", json={"prompt": "the quick brown fox " * 120}).json()["tokens"]
    ids = ids[:505]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=100, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == 505
    assert out.usage.completion_tokens == 512 - 505
    assert out.choices[0].finish_reason == "length"


def test_tokenize_detokenize_round_trip(http, client):
    text = "Once upon a time, in a small village by the sea"
    tok = http.post("/tokenize", json={"model": "tiny", "prompt": text,
                                       "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    assert len(tok["token_strs"]) == tok["count"]
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == text
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    usage = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    no_gen = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})
    assert no_gen.json()["count"] < chat["count"]
    cont = http.post("/tokenize", json={
        "messages": CHAT + [{"role": "assistant", "content": "Once"}],
        "add_generation_prompt": False, "continue_final_message": True}).json()
    assert http.post("/detokenize", json={"tokens": cont["tokens"]}).json()["prompt"] \
        .endswith("Once")


def test_chat_logprobs_and_list_of_parts_content(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]}]
    out = client.chat.completions.create(model="tiny", messages=parts, max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob <= 0
        assert item.top_logprobs[0].token == item.token  # greedy picks the top token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)
    completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=4,
                                           temperature=0, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == completion.choices[0].text


def test_chat_template_kwargs_and_request_id_echo(http):
    r = http.post("/v1/chat/completions", headers={"X-Request-Id": "abc-123"},
                  json={"model": "tiny", "messages": CHAT, "max_tokens": 2,
                        "chat_template_kwargs": {"enable_thinking": False}, "foo": "ignored"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["id"] == "chatcmpl-abc-123"


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_sum_over_workers(http):
    before = http.get("/metrics").text
    raw = [http.post("/v1/completions", json={"prompt": f"Numbers {i}", "max_tokens": 7,
                                              "ignore_eos": True}) for i in range(6)]
    assert all(r.status_code == 200 for r in raw)
    prompt_tokens = sum(r.json()["usage"]["prompt_tokens"] for r in raw)
    after = http.get("/metrics").text
    assert re.search(r'vllm:num_requests_running\{engine="0",model_name="tiny"\} 0\.0', after)
    gen = "vllm:generation_tokens_total"
    assert _metric(after, gen) - _metric(before, gen) == 42
    pt = "vllm:prompt_tokens_total"
    assert _metric(after, pt) - _metric(before, pt) == prompt_tokens
    ok = "vllm:request_success_total"
    assert _metric(after, ok, finished_reason="length") - \
        _metric(before, ok, finished_reason="length") == 6
    ttft = "vllm:time_to_first_token_seconds_count"
    assert _metric(after, ttft) - _metric(before, ttft) == 6
    for name in ("vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        assert name in after
    load = http.get("/load").json()
    assert load["server_load"] == 0


def test_deep_health_runs_one_token_without_touching_metrics(server, http):
    before = http.get("/metrics").text
    r = httpx.get(server.url + "/health?deep=1", timeout=30)  # public: no key needed
    assert r.status_code == 200
    after = http.get("/metrics").text
    gen = "vllm:generation_tokens_total"
    assert _metric(after, gen) == _metric(before, gen)
    assert httpx.post(server.url + "/ping").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
