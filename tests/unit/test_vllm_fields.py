"""The vLLM request-field inventory against fornax's request structs, and the rule for keys a
struct does not declare (no server)."""

from __future__ import annotations

import logging
import uuid

import msgspec
import numpy as np
import pytest

from fornax.api.protocol import vllm_fields as V
from fornax.api.protocol.anthropic import CountTokensRequest, MessagesRequest
from fornax.api.protocol.fields import check_json_fields, warn_unknown
from fornax.api.protocol.openai import ChatCompletionRequest, CompletionRequest
from fornax.api.protocol.pooling import (
    ClassificationRequest,
    EmbeddingRequest,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
)
from fornax.api.protocol.responses import ResponsesRequest
from fornax.api.server.errors import APIError
from fornax.runtime.sampling.logits_processors import thinking_forced_token
from fornax.runtime.sampling.params import SamplingParams

STRUCTS: dict[str, type[msgspec.Struct]] = {
    "ChatCompletionRequest": ChatCompletionRequest, "CompletionRequest": CompletionRequest,
    "ResponsesRequest": ResponsesRequest, "EmbeddingRequest": EmbeddingRequest,
    "PoolingRequest": PoolingRequest, "ClassificationRequest": ClassificationRequest,
    "ScoreRequest": ScoreRequest, "RerankRequest": RerankRequest,
    "MessagesRequest": MessagesRequest, "CountTokensRequest": CountTokensRequest,
}


def test_every_vllm_field_has_a_status() -> None:
    assert set(V.VLLM_FIELDS) == set(V.INVENTORY)
    for name, fields in V.VLLM_FIELDS.items():
        missing = [f for f in fields if f not in V.INVENTORY[name]]
        assert not missing, f"{name}: vLLM fields without a status: {missing}"
        for f, st in V.INVENTORY[name].items():
            assert st.status in (V.HONOURED, V.IGNORED, V.REJECTED), (name, f)
            if st.status != V.HONOURED:
                assert st.note, f"{name}.{f} is {st.status} without saying why"


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_inventory_matches_the_struct(name: str) -> None:
    """Honoured fields are declared by the struct (so they decode with their bounds); refused
    ones are not (the key check refuses them); every struct field is listed."""
    declared = set(STRUCTS[name].__struct_fields__)
    table = V.INVENTORY[name]
    honoured = {f for f, st in table.items() if st.status == V.HONOURED}
    assert honoured - declared == set(), f"{name}: honoured but not declared"
    rejected = {f for f, st in table.items() if st.status == V.REJECTED}
    assert rejected & declared == set(), f"{name}: declared but listed as rejected"
    assert declared - set(table) == set(), f"{name}: struct fields missing from the inventory"


def test_counts_cover_every_vllm_field() -> None:
    counts = V.counts()
    for name, fields in V.VLLM_FIELDS.items():
        assert sum(counts[name].values()) == len(fields)


def test_rejected_field_is_a_400_naming_it() -> None:
    body = b'{"messages": [], "kv_transfer_params": {"do_remote_prefill": true}}'
    with pytest.raises(APIError) as err:
        check_json_fields(ChatCompletionRequest, body)
    assert err.value.status == 400 and err.value.param == "kv_transfer_params"
    with pytest.raises(APIError) as err:
        check_json_fields(ResponsesRequest, b'{"input": "x", "watermarking": true}')
    assert err.value.param == "watermarking"  # a chat field handed on by Responses


def test_rejected_field_with_unreadable_text_is_a_400_naming_it() -> None:
    """A refused field holding invalid UTF-8 (an encoded surrogate): the struct skips it
    unread, so the check reads it first: a 400 naming it, not the decoder's error (a 500)."""
    for struct, body in ((ChatCompletionRequest, b'{"messages": [], '),
                         (MessagesRequest, b'{"max_tokens": 1, "messages": [], ')):
        body += b'"kv_transfer_params": [null, "\xed\xa0\x80"]}'
        msgspec.json.decode(body, type=struct)  # the struct takes it
        with pytest.raises(APIError) as err:
            check_json_fields(struct, body)
        assert err.value.status == 400 and err.value.param == "kv_transfer_params"


def test_rejected_field_at_its_neutral_value_passes() -> None:
    check_json_fields(ChatCompletionRequest,
                      b'{"messages": [], "watermarking": false, "stream_interval": 1, '
                      b'"kv_transfer_params": null, "routed_experts_prompt_start": 0}')


def test_unknown_field_warns_once_per_name(caplog: pytest.LogCaptureFixture) -> None:
    name = f"not_a_field_{uuid.uuid4().hex}"
    body = msgspec.json.encode({"messages": [], name: 1})
    with caplog.at_level(logging.WARNING, logger="fornax.api.protocol.fields"):
        check_json_fields(ChatCompletionRequest, body)
        check_json_fields(ChatCompletionRequest, body)
        check_json_fields(CompletionRequest, body)
    lines = [r for r in caplog.records if name in r.getMessage()]
    assert len(lines) == 1
    assert not warn_unknown(name, "ChatCompletionRequest")


def test_ignored_vllm_field_passes_quietly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fornax.api.protocol.fields"):
        check_json_fields(ChatCompletionRequest, b'{"messages": [], "session_id": "abc"}')
    assert not [r for r in caplog.records if "session_id" in r.getMessage()]


def _budget(budget: int, start: list[int] | None = None) -> SamplingParams:
    return SamplingParams(thinking_token_budget=budget, thinking_end_ids=[90, 91],
                          thinking_start_ids=start)


def test_thinking_budget_forces_the_end_marker() -> None:
    assert thinking_forced_token(_budget(3), np.array([1, 2])) is None
    assert thinking_forced_token(_budget(3), np.array([1, 2, 3])) == 90
    assert thinking_forced_token(_budget(3), np.array([1, 2, 3, 90])) == 91  # the rest of it
    assert thinking_forced_token(_budget(3), np.array([1, 2, 3, 90, 91, 5])) is None
    assert thinking_forced_token(_budget(0), np.array([], dtype=np.int64)) == 90
    # counted from after the start marker when the output opens the thinking itself
    assert thinking_forced_token(_budget(2, [7]), np.array([1, 2, 3])) is None
    assert thinking_forced_token(_budget(2, [7]), np.array([1, 7, 2])) is None
    assert thinking_forced_token(_budget(2, [7]), np.array([1, 7, 2, 3])) == 90
