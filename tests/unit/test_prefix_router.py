"""Prefix-affinity routing without a cluster: the pure policy (blocks, bounded index, affinity,
imbalance fallback, replica removal, odd bodies) and the Ray Serve router class on fake replicas."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import time

import pytest

from fornax.ray_serve.prefix_index import (
    PrefixAffinityPolicy,
    PrefixIndex,
    PrefixPolicyConfig,
    block_hashes,
    prompt_text,
)

SYSTEMS = [f"You are assistant number {i}. " + f"Rule {i}: answer briefly and politely. " * 40
           for i in range(4)]


def chat(system: str, user: str, model: str = "m") -> dict:
    return {"model": model, "messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": user}]}


def policy(**kw: int) -> PrefixAffinityPolicy:
    return PrefixAffinityPolicy(PrefixPolicyConfig.from_kwargs(kw), rng=random.Random(0))


# --- the policy ----------------------------------------------------------------------------


def test_shared_prefix_follows_first_choice_and_distinct_prefixes_spread():
    p = policy()
    loads = {"a": 0, "b": 0}
    first = {i: p.choose(chat(s, "hi"), loads) for i, s in enumerate(SYSTEMS)}
    assert {c.reason for c in first.values()} == {"no_match"}
    # fewest indexed blocks breaks the tie: four distinct prompts land two and two
    owners = [c.replica for c in first.values()]
    assert sorted(owners) == ["a", "a", "b", "b"]
    for turn in range(20):
        for i, s in enumerate(SYSTEMS):
            c = p.choose(chat(s, f"question {turn}"), loads)
            assert (c.replica, c.reason) == (owners[i], "affinity")
            assert c.matched_blocks >= len(s) // 256 - 1


def test_busy_holder_falls_back_to_least_loaded_and_the_prefix_follows():
    p = policy(imbalance_threshold=3)
    assert p.choose(chat(SYSTEMS[0], "x"), {"a": 0, "b": 5}).replica == "a"
    # exactly at the threshold: still the holder
    assert p.choose(chat(SYSTEMS[0], "y"), {"a": 3, "b": 0}).reason == "affinity"
    c = p.choose(chat(SYSTEMS[0], "z"), {"a": 4, "b": 0})
    assert (c.replica, c.reason) == ("b", "imbalance")
    # the fallback was recorded: both now hold the prefix, and share it by load
    assert p.choose(chat(SYSTEMS[0], "w"), {"a": 1, "b": 0}).replica == "b"
    c = p.choose(chat(SYSTEMS[0], "v"), {"a": 0, "b": 1})
    assert (c.replica, c.reason) == ("a", "affinity")
    assert p.counts["imbalance"] == 1
    # a replica holding nothing of it is not a holder: c stays out while within the threshold
    assert p.choose(chat(SYSTEMS[0], "u"), {"a": 2, "b": 2, "c": 0}).replica in {"a", "b"}


def test_longest_match_wins_over_a_shorter_one():
    p = policy()
    short = "s" * 1024
    p.record(p.hashes_of({"prompt": short}), "a")
    p.record(p.hashes_of({"prompt": short + "t" * 2048}), "b")
    # the first blocks now belong to b (last writer), a deeper one too
    c = p.choose({"prompt": short + "t" * 2048 + "new"}, {"a": 0, "b": 0})
    assert (c.replica, c.reason) == ("b", "affinity") and c.matched_blocks == 12
    # a holder that is no longer a candidate is passed over, a shallower candidate match is kept
    idx = PrefixIndex(100)
    hs = block_hashes("q" * 1024, 256, 64)
    idx.record(hs[:2], "a")
    idx.record(hs[2:], "gone")
    assert idx.longest_match(hs, {"a", "b"}) == (["a"], 2)


def test_index_is_bounded_and_lru():
    idx = PrefixIndex(max_entries=50)
    rng = random.Random(1)
    keep = block_hashes("k" * 256 * 5, 256, 64)
    idx.record(keep, "a")
    for i in range(200):
        idx.record(block_hashes(f"{i}-" + "x" * 600, 256, 64), rng.choice("abc"))
        idx.longest_match(keep, {"a"})  # touched: most recently used
        assert len(idx) <= 50
        assert sum(idx.owned(r) for r in "abc") == len(idx)
    assert idx.longest_match(keep, {"a"}) == (["a"], 5)
    # several holders per entry, at most max_holders (the oldest leaves)
    shared = PrefixIndex(max_entries=10, max_holders=2)
    for r in "abc":
        shared.record(keep, r)
    assert shared.longest_match(keep, {"a", "b", "c"}) == (["b", "c"], 5)
    assert (shared.owned("a"), shared.owned("b"), shared.owned("c")) == (0, 5, 5)
    shared.remove_replica("b")
    assert shared.longest_match(keep, {"a", "b", "c"}) == (["c"], 5) and len(shared) == 5
    shared.remove_replica("c")
    assert len(shared) == 0 and shared.longest_match(keep, {"c"}) == ([], 0)


def test_replicas_that_leave_are_forgotten():
    p = policy()
    for i, s in enumerate(SYSTEMS):
        p.choose(chat(s, "hi"), {"a": 0, "b": 0, "c": 0})
    held_by_c = p.index.owned("c")
    assert held_by_c > 0
    size = len(p.index)
    p.retain({"a", "b"})
    assert p.index.owned("c") == 0 and len(p.index) == size - held_by_c
    p.remove_replica("b")
    assert p.index.owned("b") == 0 and len(p.index) == p.index.owned("a")
    for s in SYSTEMS:
        assert p.choose(chat(s, "again"), {"a": 0, "d": 0}).replica in {"a", "d"}
    assert p.choose(chat(SYSTEMS[0], "x"), {}) is None


def test_huge_prompt_hashes_at_most_max_blocks():
    p = policy(block_chars=64, max_blocks=8)
    body = {"messages": [{"role": "user", "content": "z" * 20_000_000}]}
    t = time.perf_counter()
    hashes = p.hashes_of(body)
    assert hashes is not None and len(hashes) == 8
    assert len(prompt_text(body, 512)) == 512
    assert time.perf_counter() - t < 5  # slicing, not walking 20 MB (loose: a loaded machine)
    assert len(block_hashes("y" * 10_000, 16, 3)) == 3


@pytest.mark.parametrize("body", [
    None, [], "text", b"{}", 42, {}, {"messages": []}, {"messages": "hi"}, {"prompt": ""},
    {"prompt": []}, {"prompt": None}, {"prompt": [True, False]}, {"prompt": [{"a": 1}]},
    {"input": None}, {"input": 3}, {"messages": [None, 3, "x", []]},
    {"messages": [{"role": "user", "content": {"nested": [1, 2]}}]},
    {"messages": [{"role": None, "content": None, "tool_calls": "bad"}]},
    {"messages": [{"role": "user", "content": [None, 1, {"type": 5}, {"type": "image_url"}]}]},
])
def test_odd_bodies_route_by_load_without_raising(body):
    p = policy()
    c = p.choose(body, {"a": 3, "b": 1})
    assert c is not None and c.replica == "b" and c.reason in {"no_prompt", "no_match"}
    assert c.matched_blocks == 0


def test_canonical_text_tells_roles_models_parts_and_tools_apart():
    user = chat("s" * 300, "u")
    other_role = {"model": "m", "messages": [{"role": "user", "content": "s" * 300}]}
    assert prompt_text(user, 10_000) != prompt_text(other_role, 10_000)
    assert prompt_text(chat("x", "y", model="m1"), 100) != prompt_text(chat("x", "y", "m2"), 100)
    img = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "u1"}}]}]}
    img2 = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "u2"}}]}]}
    assert prompt_text(img, 1000) != prompt_text(img2, 1000)
    tool_turn = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"}]}
    text = prompt_text(tool_turn, 10_000)
    assert text is not None and "get_weather" in text and "Oslo" in text and "c1" in text
    # a conversation that grows keeps its earlier text as a prefix (multi-turn affinity)
    longer = {"messages": tool_turn["messages"] + [{"role": "assistant", "content": "ok"}]}
    assert prompt_text(longer, 10_000).startswith(text)
    # completion prompts: text, token ids, a batch (its first); Responses input
    assert prompt_text({"prompt": "abc"}, 100).endswith("abc")
    assert "1,2,3" in prompt_text({"prompt": [1, 2, 3]}, 100)
    assert prompt_text({"prompt": ["abc", "zzz"]}, 100) == prompt_text({"prompt": "abc"}, 100)
    responses = prompt_text({"instructions": "be brief", "input": "hello"}, 100)
    assert responses is not None and "be brief" in responses and "hello" in responses
    # lone surrogates (JSON allows them) hash without error
    assert len(block_hashes("\ud800" * 64, 16, 8)) == 4


@pytest.mark.parametrize("kwargs, field", [
    ({"block_size": 4}, "block_size"), ({"block_chars": 8}, "block_chars"),
    ({"max_blocks": 0}, "max_blocks"), ({"max_entries": True}, "max_entries"),
    ({"imbalance_threshold": -1}, "imbalance_threshold"),
    ({"min_match_blocks": "2"}, "min_match_blocks"),
])
def test_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"request_router_kwargs.{field}"):
        PrefixPolicyConfig.from_kwargs(kwargs)


def test_config_roundtrip():
    cfg = PrefixPolicyConfig.from_kwargs({"imbalance_threshold": 0, "block_chars": 64})
    assert PrefixPolicyConfig.from_kwargs(cfg.as_kwargs()) == cfg
    assert PrefixPolicyConfig.from_kwargs(None) == PrefixPolicyConfig()


# --- the Ray Serve router class on fake replicas ----------------------------------------------

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None and not os.environ.get("CI"),
    reason="needs fornax[ray] (make test installs it; under CI its absence fails)")


class _FakeReplica:
    """What RequestRouter reads of a RunningReplica."""

    def __init__(self, name: str) -> None:
        from ray.serve._private.common import DeploymentID, ReplicaID

        self.replica_id = ReplicaID(unique_id=name, deployment_id=DeploymentID("d", "app"))
        self.max_ongoing_requests = 100
        self.node_id = "n"
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def _pending(rid: str, *args, **kwargs):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    return PendingRequest(args=list(args), kwargs=kwargs,
                          metadata=RequestMetadata(request_id=rid, internal_request_id=rid))


def _router(**state):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from fornax.ray_serve.prefix_router import PrefixAffinityRouter

    r = PrefixAffinityRouter(deployment_id=DeploymentID("d", "app"),
                                        handle_source=DeploymentHandleSource.UNKNOWN,
                                        use_replica_queue_len_cache=True)
    r.initialize_state(**state)
    return r


@needs_ray
def test_router_class_affinity_fallback_and_departures():
    async def scenario() -> None:
        router = _router(imbalance_threshold=1)
        a, b = _FakeReplica("a"), _FakeReplica("b")
        router.update_replicas([a, b])
        body = chat(SYSTEMS[0], "hi")
        ranks = await router.choose_replicas([a, b], _pending("r1", body))
        holder = ranks[0][0]
        other = b if holder is a else a
        assert ranks == [[holder], [other]]
        # Serve reports where it went; later requests, body as keyword or raw JSON, follow
        router.on_request_routed(_pending("r1", body), holder.replica_id, None)
        router.on_send_request(holder.replica_id)
        for req in (_pending("r2", body=chat(SYSTEMS[0], "more")),
                    _pending("r3", "POST", "/v1/chat/completions", "",  # ModelReplica.forward
                             [("content-type", "application/json")],
                             b'{"model": "m", "messages": [{"role": "system", "content": "'
                             + SYSTEMS[0].encode() + b'"}]}')):
            assert (await router.choose_replicas([a, b], req))[0] == [holder]
        # the holder gets busy (queue-length cache): the other replica takes the prefix
        router.replica_queue_len_cache.update(holder.replica_id, 3)
        router.replica_queue_len_cache.update(other.replica_id, 0)
        assert (await router.choose_replicas([a, b], _pending("r4", body)))[0] == [other]
        router.on_request_completed(holder.replica_id, "r1")
        assert router._inflight == {}
        # unreadable arguments: routed by load, never an exception
        for req in (None, _pending("r5"), _pending("r6", object(), body=3),
                    _pending("r7", b"{not json"), _pending("r8", "x" * 100)):
            ranks = await router.choose_replicas([a, b], req)
            assert ranks and ranks[0] and ranks[0][0] in (a, b)
        assert await router.choose_replicas([], _pending("r9", body)) == []
        # a replica that dies or leaves is dropped from the index
        router.on_replica_actor_died(other.replica_id)
        assert router.policy.index.owned(other.replica_id.to_full_id_str()) == 0
        router.update_replicas([other])
        assert len(router.policy.index) == 0

    asyncio.run(scenario())


@needs_ray
def test_router_bad_kwargs_fall_back_to_defaults():
    assert _router(block_chars=1).policy.config == PrefixPolicyConfig()


def test_yaml_refuses_bad_router_kwargs_naming_them():
    from fornax.ray_serve.config import deployment_spec
    from fornax.runtime.errors import ConfigError

    spec = deployment_spec("deployment", {"request_router": "prefix",
                                          "request_router_kwargs": {"imbalance_threshold": 2}})
    assert spec.request_router_kwargs == {"imbalance_threshold": 2}
    with pytest.raises(ConfigError, match=r"deployment\.request_router_kwargs\.block_chars"):
        deployment_spec("deployment", {"request_router": "prefix",
                                       "request_router_kwargs": {"block_chars": 0}})
    with pytest.raises(ConfigError, match="only with request_router: prefix"):
        deployment_spec("deployment", {"request_router_kwargs": {"max_blocks": 4}})
