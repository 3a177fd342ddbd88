"""Every generation parameter through the official `openai` client, streamed and not."""

from __future__ import annotations

import httpx
import openai
import pytest

from helpers.api_server import API_KEYS, auth

MODEL = "tiny"
PROMPT = "The quick brown fox jumps over"
EOS, IM_START = 2, 1


@pytest.fixture(scope="module")
def client(main_server):
    return openai.OpenAI(base_url=main_server.url + "/v1", api_key=API_KEYS[0], max_retries=0,
                         timeout=60)


def complete(client, stream: bool, **kw) -> tuple[str, list[int], str | None, object]:
    """(text, token ids, finish reason, usage) of choice 0, from either response shape."""
    kw.setdefault("max_tokens", 8)
    extra = kw.pop("extra", {})
    body = dict(model=MODEL, prompt=kw.pop("prompt", PROMPT), logprobs=0, stream=stream,
                extra_body={"return_tokens_as_token_ids": True, **extra}, **kw)
    if not stream:
        r = client.completions.create(**body)
        c = r.choices[0]
        return c.text, _ids(c.logprobs.tokens), c.finish_reason, r.usage
    text, tokens, finish, usage = "", [], None, None
    for chunk in client.completions.create(stream_options={"include_usage": True}, **body):
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.text
            tokens += c.logprobs.tokens if c.logprobs else []
            finish = c.finish_reason or finish
    return text, _ids(tokens), finish, usage


def _ids(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


BOTH = pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])


@BOTH
def test_greedy_equivalents_and_seeds(client, stream) -> None:
    greedy = complete(client, False, temperature=0)[1]
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        assert complete(client, stream, temperature=1.5, seed=3, extra=extra)[1] == greedy
    assert complete(client, stream, temperature=1.5, top_p=1e-6, seed=3)[1] == greedy
    a = complete(client, stream, temperature=1.8, seed=42, max_tokens=12)
    b = complete(client, not stream, temperature=1.8, seed=42, max_tokens=12)
    assert a[1] == b[1] and a[0] == b[0]


@BOTH
def test_penalties_change_the_output(client, stream) -> None:
    base = complete(client, stream, temperature=0, max_tokens=24,
                    extra={"ignore_eos": True})[1]
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
               {"extra": {"repetition_penalty": 2.0, "ignore_eos": True}}):
        kw.setdefault("extra", {"ignore_eos": True})
        out = complete(client, stream, temperature=0, max_tokens=24, **kw)[1]
        assert out != base, kw


@BOTH
def test_logit_bias_allowed_ids_bad_words_and_stop_ids(client, main_server, stream) -> None:
    forced = complete(client, stream, temperature=0, logit_bias={"42": 100},
                      extra={"ignore_eos": True})[1]
    assert forced == [42] * 8
    allowed = complete(client, stream, temperature=1.5, seed=1, max_tokens=16,
                       extra={"allowed_token_ids": [40, 41, 42], "ignore_eos": True})[1]
    assert set(allowed) <= {40, 41, 42}
    free = complete(client, stream, temperature=0, max_tokens=16, extra={"ignore_eos": True})[1]
    stop_id = free[3]
    cut = complete(client, stream, temperature=0, max_tokens=16,
                   extra={"stop_token_ids": [stop_id]})
    assert cut[1] == free[: free.index(stop_id) + 1] and cut[2] == "stop"
    first_word = httpx.post(main_server.url + "/detokenize", headers=auth(),
                            json={"model": MODEL, "tokens": free[:1]}).json()["prompt"]
    banned = complete(client, stream, temperature=0, max_tokens=16,
                      extra={"bad_words": [first_word], "ignore_eos": True})[1]
    assert free[0] not in banned


@BOTH
def test_min_tokens_ignore_eos_and_max_tokens(client, stream) -> None:
    eos_bias = {str(EOS): 100}
    short = complete(client, stream, temperature=0, logit_bias=eos_bias)
    assert short[1] == [EOS] and short[2] == "stop"
    held = complete(client, stream, temperature=0, logit_bias=eos_bias, extra={"min_tokens": 5})
    assert len(held[1]) == 6 and held[1][-1] == EOS and EOS not in held[1][:5]
    ignored = complete(client, stream, temperature=0, logit_bias=eos_bias, max_tokens=7,
                       extra={"ignore_eos": True})
    assert len(ignored[1]) == 7 and ignored[2] == "length"
    assert ignored[3].completion_tokens == 7


@BOTH
def test_stop_strings_and_special_tokens_in_text(client, stream) -> None:
    text = complete(client, stream, temperature=0, max_tokens=16, extra={"ignore_eos": True})[0]
    stop = text[3:5]
    cut = complete(client, stream, temperature=0, max_tokens=16, stop=[stop],
                   extra={"ignore_eos": True})
    assert cut[0] == text[: text.index(stop)] and cut[2] == "stop"
    kept = complete(client, stream, temperature=0, max_tokens=16, stop=[stop],
                    extra={"include_stop_str_in_output": True, "ignore_eos": True})
    assert kept[0] == text[: text.index(stop) + len(stop)]
    bias = {str(IM_START): 100}
    shown = complete(client, stream, temperature=0, max_tokens=2, logit_bias=bias,
                     extra={"skip_special_tokens": False, "ignore_eos": True})
    hidden = complete(client, stream, temperature=0, max_tokens=2, logit_bias=bias,
                      extra={"ignore_eos": True})
    assert shown[0] == "<|im_start|><|im_start|>" and hidden[0] == ""


@BOTH
def test_truncation_cache_salt_and_n(client, stream) -> None:
    long_prompt = "one two three four five six seven eight nine ten " * 6
    trunc = complete(client, stream, prompt=long_prompt, extra={"truncate_prompt_tokens": 5})
    assert trunc[3].prompt_tokens == 5
    shared = "a prefix long enough to fill several cache blocks " * 4
    r1 = complete(client, stream, prompt=shared, max_tokens=1, extra={"cache_salt": f"a{stream}"})
    r2 = complete(client, stream, prompt=shared, max_tokens=1, extra={"cache_salt": f"a{stream}"})
    r3 = complete(client, stream, prompt=shared, max_tokens=1, extra={"cache_salt": f"b{stream}"})
    assert r2[3].prompt_tokens_details.cached_tokens > 0
    assert r3[3].prompt_tokens_details.cached_tokens == 0
    assert r1[3].prompt_tokens == r3[3].prompt_tokens
    if not stream:
        many = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=4, seed=5,
                                         temperature=1.5)
        assert sorted(c.index for c in many.choices) == [0, 1, 2]


@BOTH
def test_chat_parameters(client, stream) -> None:
    msgs = [{"role": "user", "content": "Say something"}]
    kw = dict(model=MODEL, messages=msgs, temperature=0, max_completion_tokens=6, logprobs=True,
              top_logprobs=2, seed=1, extra_body={"ignore_eos": True})
    if stream:
        text, entries = "", []
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                text += c.delta.content or ""
                entries += c.logprobs.content if c.logprobs and c.logprobs.content else []
    else:
        c = client.chat.completions.create(**kw).choices[0]
        text, entries = c.message.content, c.logprobs.content
    assert len(entries) == 6 and "".join(e.token for e in entries) == text
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy = top-1


@pytest.mark.parametrize("extra, param", [
    ({"top_p": 0.0}, "top_p"), ({"top_k": -5}, "top_k"), ({"temperature": -1.0}, "temperature"),
    ({"n": 1000}, "n"), ({"stop": ["x"] * 100}, "stop"), ({"logit_bias": {"999999": 1}},
                                                          "logit_bias"),
    ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 5.0}, "presence_penalty"), ({"logprobs": 1000}, "logprobs"),
    ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
])
def test_invalid_values_are_400s_naming_the_field(client, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                  extra_body=extra)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param, err.value.body
