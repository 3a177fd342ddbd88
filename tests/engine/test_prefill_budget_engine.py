"""The adaptive prefill budget in a real engine on a tiny model: a long prompt that arrives while
a stream decodes is prefilled in chunks, the stream gets a token every step, and the engine's own
step timing feeds the cost model."""

from __future__ import annotations

from dataclasses import dataclass

from fornax.runtime.engine.messages import EngineCoreRequest
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.scheduler.prefill_budget import StepCostModel


@dataclass
class FixedCost:
    decode_s: float | None = 0.010
    prefill_s_per_token: float | None = 0.00025  # factor 2: 40 prompt tokens a step


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_long_prompt_is_chunked_while_a_stream_keeps_decoding(make_llm) -> None:
    llm = make_llm(enable_prefix_caching=False, prefill_itl_factor=2.0)
    engine = llm.engine
    engine.scheduler.prefill_budget.model = FixedCost()
    long_prompt = [(7 * i + 3) % 200 + 10 for i in range(150)]
    engine.add_request(EngineCoreRequest("stream", list(range(20, 28)), _params(40)))
    outputs = engine.step()
    assert [o.request_id for o in outputs] == ["stream"]  # its prompt fit one step

    engine.add_request(EngineCoreRequest("long", long_prompt, _params(4)))
    long_req = engine.scheduler.requests["long"]
    chunks, long_tokens = [], []
    while long_req.num_output_tokens == 0:
        before = long_req.num_computed_tokens
        outputs = {o.request_id: o for o in engine.step()}
        assert len(outputs["stream"].new_token_ids) == 1  # a token for the stream every step
        chunks.append(long_req.num_computed_tokens - before)
        long_tokens += outputs["long"].new_token_ids if "long" in outputs else []
    assert chunks == [40, 40, 40, 30]  # 150 prompt tokens, 40 a step while the stream decodes
    while engine.has_unfinished_requests():
        outputs = {o.request_id: o for o in engine.step()}
        long_tokens += outputs["long"].new_token_ids if "long" in outputs else []

    # the chunked prompt generates what the same prompt prefilled in one step generates
    alone = llm.generate({"prompt_token_ids": long_prompt}, _params(4))
    assert long_tokens == alone[0].outputs[0].token_ids


def test_the_engine_times_its_steps_into_the_cost_model(make_llm) -> None:
    llm = make_llm(enable_prefix_caching=False)
    model = llm.engine.scheduler.prefill_budget.model
    assert isinstance(model, StepCostModel)
    assert model.decode_s is None and model.prefill_s_per_token is None
    llm.generate([{"prompt_token_ids": list(range(30, 90))}], _params(6))
    assert model.decode_s is not None and model.decode_s > 0
    assert model.prefill_s_per_token is not None and model.prefill_s_per_token > 0
