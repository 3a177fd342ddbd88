"""Sampling extras over HTTP (tiny llama): best_of, prompt logprobs, echo + logprobs, bad words."""

from __future__ import annotations

import httpx
import pytest

from helpers.api_server import auth


@pytest.fixture(scope="module")
def http(main_server):
    with httpx.Client(base_url=main_server.url, headers=auth(), timeout=60) as c:
        yield c


def _complete(http, **body) -> dict:
    r = http.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_best_of_returns_the_most_likely_candidate(http):
    common = dict(prompt="The quick brown fox", max_tokens=6, temperature=1.0, seed=11,
                  ignore_eos=True)
    candidates = _complete(http, n=3, logprobs=0, **common)["choices"]
    scores = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in candidates}
    best = _complete(http, n=1, best_of=3, **common)
    assert len(best["choices"]) == 1 and best["choices"][0]["index"] == 0
    assert best["choices"][0]["text"] == max(scores, key=scores.get)
    assert best["choices"][0]["logprobs"] is None  # not asked for
    assert best["usage"]["completion_tokens"] == 18  # every candidate was generated
    two = _complete(http, n=2, best_of=3, **common)["choices"]
    assert [c["index"] for c in two] == [0, 1]
    assert [c["text"] for c in two] == sorted(scores, key=scores.get, reverse=True)[:2]
    r = http.post("/v1/completions", json={**common, "n": 1, "best_of": 3, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    r = http.post("/v1/completions", json={**common, "n": 3, "best_of": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_prompt_logprobs_and_echo_with_logprobs(http):
    ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    out = _complete(http, prompt=ids, max_tokens=2, prompt_logprobs=1)
    plp = out["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for tid, entry in zip(ids[1:], plp[1:]):
        assert str(tid) in entry and entry[str(tid)]["logprob"] <= 0
    echo = _complete(http, prompt=ids, max_tokens=3, echo=True, logprobs=1, ignore_eos=True,
                     temperature=0)["choices"][0]
    lp = echo["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None
    assert all(isinstance(v, float) for v in lp["token_logprobs"][1:])
    assert lp["token_logprobs"][1] == pytest.approx(plp[1][str(ids[1])]["logprob"], abs=1e-4)
    assert "".join(lp["tokens"]) == echo["text"]
    assert echo["prompt_logprobs"] is None  # only when asked for
    chat = http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == \
        chat["usage"]["prompt_tokens"]


def test_penalties_bad_words_and_repetition_detection_reach_the_engine(http):
    base = dict(prompt="Numbers: 1 2 3", max_tokens=12, temperature=0, ignore_eos=True,
                logprobs=0)
    plain = _complete(http, **base)["choices"][0]
    first = plain["logprobs"]["tokens"][0]
    if first.strip().isalnum():
        banned = _complete(http, bad_words=[first.strip()], **base)["choices"][0]
        assert banned["logprobs"]["tokens"][0] != first
    only = http.post("/detokenize", json={"tokens": [300]}).json()["prompt"]
    forced = dict(prompt="x", max_tokens=60, temperature=0, ignore_eos=True,
                  logit_bias={"300": 100})
    assert _complete(http, **forced)["choices"][0]["text"] == only * 60
    penalised = _complete(http, frequency_penalty=2.0, **forced)["choices"][0]["text"]
    assert penalised.startswith(only * 10) and penalised != only * 60
    repeat = _complete(http, prompt="x", max_tokens=50, temperature=0, ignore_eos=True,
                       logit_bias={"300": 100},
                       repetition_detection={"min_pattern_size": 1, "max_pattern_size": 2,
                                             "min_count": 5})["choices"][0]
    assert repeat["text"] == only * 5 and repeat["finish_reason"] == "stop"
    bad = http.post("/v1/completions", json={**base, "repetition_detection": {"nope": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "repetition_detection"
    bad = http.post("/v1/completions", json={**base, "logit_bias": {"abc": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
    bad = http.post("/v1/completions", json={**base, "presence_penalty": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "presence_penalty"


def test_beam_search_matches_the_offline_engine(http):
    from fornax.runtime import LLM
    from fornax.runtime.sampling.beam_search import BeamSearchParams
    from helpers.api_server import tiny_model_path

    prompt = "The inference server schedules requests"
    greedy = _complete(http, prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True)
    width1 = _complete(http, prompt=prompt, max_tokens=8, use_beam_search=True, n=1,
                       ignore_eos=True)
    assert width1["choices"][0]["text"] == greedy["choices"][0]["text"]
    out = _complete(http, prompt=prompt, max_tokens=8, use_beam_search=True, n=3,
                    ignore_eos=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["completion_tokens"] == 24
    llm = LLM(str(tiny_model_path("llama")), max_model_len=512, device="cpu", dtype="float32")
    offline = llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=8,
                                                         ignore_eos=True))[0]
    assert [c["text"] for c in out["choices"]] == [o.text for o in offline.outputs]
    chat = http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "use_beam_search": True, "n": 2}).json()
    assert len(chat["choices"]) == 2
