"""vLLM's request fields on a real `fornax serve` through the real openai / anthropic clients:
each honoured field changes the output as vLLM's does, each refused one is a 400 naming it, and an
unknown field is answered (200) with one warning in the server log. The thinker model (a tiny
random llama with Qwen3's <think> tokens, --reasoning-parser qwen3) thinks from its first token,
so its whole output is reasoning unless a field ends the thinking."""

from __future__ import annotations

import uuid

import anthropic
import openai
import pytest

from helpers.thinker import end_think_id

ASK = [{"role": "user", "content": "Say something."}]
GREEDY = {"temperature": 0.0, "max_tokens": 10}
TOOLS = [{"type": "function", "function": {
    "name": "get_time", "strict": True,
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                   "required": ["zone"]}}}]



@pytest.fixture(scope="module")
def end_id(thinker_http) -> int:
    return end_think_id(thinker_http)


def _chat(client: openai.OpenAI, **extra):
    return client.chat.completions.create(model="thinker", messages=ASK, **GREEDY,
                                          extra_body=extra)


def _refused(call, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        call()
    assert err.value.status_code == 400
    assert err.value.body["param"] == param, err.value.body


# ---- chat --------------------------------------------------------------------------------------


def test_reasoning_effort_none_ends_the_thinking_in_the_prompt(thinker_client) -> None:
    thinking = _chat(thinker_client, reasoning_effort="high", return_prompt_text=True)
    assert thinking.prompt_text.endswith("<think>\n")
    assert thinking.choices[0].message.reasoning  # all reasoning: the model never closes it
    off = _chat(thinker_client, reasoning_effort="none", return_prompt_text=True)
    assert off.prompt_text.rstrip().endswith("</think>")
    assert off.choices[0].message.reasoning is None and off.choices[0].message.content
    # the request's own enable_thinking wins over reasoning_effort
    kept = _chat(thinker_client, reasoning_effort="none", return_prompt_text=True,
                 chat_template_kwargs={"enable_thinking": True})
    assert kept.prompt_text.endswith("<think>\n")


def test_include_reasoning_false_drops_the_reasoning(thinker_client) -> None:
    assert _chat(thinker_client).choices[0].message.reasoning
    dropped = _chat(thinker_client, include_reasoning=False)
    assert dropped.choices[0].message.reasoning is None
    chunks = list(thinker_client.chat.completions.create(
        model="thinker", messages=ASK, **GREEDY, stream=True,
        extra_body={"include_reasoning": False}))
    assert not any(getattr(c.choices[0].delta, "reasoning", None) for c in chunks if c.choices)


def test_return_token_ids_whole_and_streamed(thinker_client, thinker_http) -> None:
    whole = _chat(thinker_client, return_token_ids=True)
    ids = whole.choices[0].token_ids
    assert len(ids) == whole.usage.completion_tokens
    assert len(whole.prompt_token_ids) == whole.usage.prompt_tokens
    chunks = list(thinker_client.chat.completions.create(
        model="thinker", messages=ASK, **GREEDY, stream=True,
        extra_body={"return_token_ids": True}))
    assert chunks[0].prompt_token_ids == whole.prompt_token_ids
    assert all(getattr(c, "prompt_token_ids", None) is None for c in chunks[1:])
    streamed = [t for c in chunks if c.choices for t in (c.choices[0].token_ids or [])]
    assert streamed == ids
    plain = _chat(thinker_client)
    assert plain.choices[0].token_ids is None and getattr(plain, "prompt_token_ids", None) is None


def test_thinking_token_budget_forces_the_end_of_thinking(thinker_client, end_id) -> None:
    free = _chat(thinker_client, return_token_ids=True)
    assert end_id not in free.choices[0].token_ids  # it would think through max_tokens
    for budget in (0, 3):
        out = _chat(thinker_client, thinking_token_budget=budget, return_token_ids=True)
        ids = out.choices[0].token_ids
        assert ids[budget] == end_id and end_id not in ids[:budget]
        assert out.choices[0].message.content  # the rest is the answer
    assert _chat(thinker_client, thinking_token_budget=-1, return_token_ids=True) \
        .choices[0].token_ids == free.choices[0].token_ids  # -1: unlimited
    _refused(lambda: _chat(thinker_client, thinking_token_budget=-2), "thinking_token_budget")
    _refused(lambda: _chat(thinker_client, thinking_token_budget="many"), "thinking_token_budget")


def test_truncation_side_on_completions(thinker_client, thinker_http) -> None:
    prompt = [5, 6, 7, 8, 9]
    for side, kept in (("left", [8, 9]), ("right", [5, 6]), (None, [8, 9])):
        extra = {"truncate_prompt_tokens": 2, "return_token_ids": True}
        if side:
            extra["truncation_side"] = side
        out = thinker_client.completions.create(model="thinker", prompt=prompt, max_tokens=2,
                                                temperature=0.0, extra_body=extra)
        assert out.choices[0].prompt_token_ids == kept
        assert len(out.choices[0].token_ids) == out.usage.completion_tokens
    _refused(lambda: thinker_client.completions.create(
        model="thinker", prompt=prompt, max_tokens=2,
        extra_body={"truncation_side": "middle"}), "truncation_side")


def test_vllm_xargs_bounded_and_refused_by_key(thinker_client) -> None:
    assert _chat(thinker_client, vllm_xargs={}).choices
    _refused(lambda: _chat(thinker_client, vllm_xargs={"my_processor": 1}),
             "vllm_xargs.my_processor")
    _refused(lambda: _chat(thinker_client, vllm_xargs={f"k{i}": i for i in range(100)}),
             "vllm_xargs")
    with pytest.raises(openai.BadRequestError) as err:  # msgspec names a value's path [...]
        _chat(thinker_client, vllm_xargs={"k": {"nested": 1}})
    assert err.value.body["param"].startswith("vllm_xargs")


def test_tool_strict(thinker_client) -> None:
    out = thinker_client.chat.completions.create(
        model="thinker", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=600,
        temperature=1.0, seed=1, parallel_tool_calls=False,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and '"zone"' in call.function.arguments
    bad = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": "yes"}}]
    _refused(lambda: thinker_client.chat.completions.create(
        model="thinker", messages=ASK, tools=bad, max_tokens=2), "tools[0].function.strict")


def test_refused_vllm_fields_name_themselves(thinker_client) -> None:
    _refused(lambda: _chat(thinker_client, kv_transfer_params={"do_remote_decode": True}),
             "kv_transfer_params")
    _refused(lambda: _chat(thinker_client, logprob_token_ids=[1, 2], logprobs=True),
             "logprob_token_ids")
    _refused(lambda: _chat(thinker_client, watermarking=True), "watermarking")
    assert _chat(thinker_client, watermarking=False, session_id="s-1").choices  # neutral / ignored


def test_unknown_field_is_answered_and_logged_once(thinker_client, thinker_server) -> None:
    name = f"no_such_field_{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        assert _chat(thinker_client, **{name: 1}).choices
    assert thinker_server.log().count(f"ignoring request field '{name}'") == 1


# ---- Responses ---------------------------------------------------------------------------------


def test_responses_fields(thinker_client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        thinker_client.responses.create(model="thinker", input="hi", max_output_tokens=4,
                                include=["reasoning.encrypted_content"])
    assert err.value.body["param"] == "include"
    out = thinker_client.responses.create(model="thinker", input="hi", max_output_tokens=6,
                                  temperature=0.0, reasoning={"effort": "none"},
                                  include=["message.output_text.logprobs"], top_logprobs=2)
    assert [o.type for o in out.output] == ["message"]  # effort none: no reasoning item
    logprobs = out.output[0].content[0].logprobs
    assert logprobs and all(len(lp.top_logprobs) == 2 for lp in logprobs)
    thinking = thinker_client.responses.create(model="thinker", input="hi", max_output_tokens=6,
                                       temperature=0.0)
    assert thinking.output[0].type == "reasoning"


def test_responses_truncation(thinker_client) -> None:
    long_input = "word " * 1500  # past the thinker's 1024-token context
    with pytest.raises(openai.BadRequestError):
        thinker_client.responses.create(model="thinker", input=long_input, max_output_tokens=4)
    out = thinker_client.responses.create(model="thinker", input=long_input, max_output_tokens=4,
                                  truncation="auto")
    assert out.status in ("completed", "incomplete") and out.usage.input_tokens <= 1020


def test_responses_max_tool_calls_zero(thinker_client) -> None:
    tools = [{"type": "function", "name": "get_time", "parameters": TOOLS[0]["function"]
              ["parameters"]}]
    out = thinker_client.responses.create(model="thinker", input="time?", tools=tools,
                                  tool_choice="required", max_output_tokens=30,
                                  max_tool_calls=0, temperature=0.0)
    assert not [o for o in out.output if o.type == "function_call"]


# ---- Anthropic ---------------------------------------------------------------------------------


def test_anthropic_thinking_budget_and_template_kwargs(thinker_server) -> None:
    client = anthropic.Anthropic(base_url=thinker_server.url, api_key="none", max_retries=0,
                                 timeout=120)
    ask = [{"role": "user", "content": "Say something."}]
    greedy = {"temperature": 0.0}
    free = client.messages.create(model="thinker", messages=ask, max_tokens=10,
                                  extra_body=greedy,
                                  thinking={"type": "enabled", "budget_tokens": 4096})
    assert [b.type for b in free.content] == ["thinking"]
    bounded = client.messages.create(model="thinker", messages=ask, max_tokens=10,
                                     extra_body=greedy,
                                     thinking={"type": "enabled", "budget_tokens": 2})
    assert [b.type for b in bounded.content] == ["thinking", "text"]
    # the request's chat_template_kwargs are kept when `thinking` is absent
    kept = client.messages.create(model="thinker", messages=ask, max_tokens=10,
                                  extra_body={**greedy, "chat_template_kwargs":
                                              {"enable_thinking": False}})
    assert [b.type for b in kept.content] == ["text"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="thinker", messages=ask, max_tokens=4,
                               thinking={"type": "enabled", "budget_tokens": -5})
