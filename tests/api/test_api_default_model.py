"""Quality checks of `fornax serve` with no MODEL: the packaged SmolLM2 answers sensibly."""

from __future__ import annotations

import openai
import pytest

from helpers.api_server import serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    with serving(None, "--max-model-len", "2048", timeout_s=300) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                            timeout=120)


def test_serves_the_packaged_model_under_its_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].model_extra["root"].endswith(".gguf")
    assert models[0].model_extra["max_model_len"] == 2048


def test_chat_answers_a_simple_question(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                         max_tokens=30, temperature=0)
    text = out.choices[0].message.content
    assert "Paris" in text, text
    assert out.choices[0].finish_reason == "stop"  # ends with its end-of-turn token
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=30, temperature=0,
        stream=True) if c.choices)
    assert streamed == text


def test_completion_continues_text(client):
    out = client.completions.create(model="SmolLM2-135M-Instruct",
                                    prompt="The capital of Italy is Rome. The capital of France is",
                                    max_tokens=5, temperature=0)
    assert "Paris" in out.choices[0].text, out.choices[0].text
