"""`fornax bench ray-affinity` without a cluster: its workload, its YAML (accepted by
fornax.ray_serve.config) and its reading of the merged per-replica /metrics."""

from __future__ import annotations

import argparse

from fornax.perf import ray_affinity
from fornax.ray_serve.config import plan_from_mapping
from fornax.ray_serve.metrics import merge


def _args(**over: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ray_affinity.add_parser(parser.add_subparsers())
    args = parser.parse_args(["ray-affinity", "--model", "/models/m"])
    for key, value in over.items():
        setattr(args, key, value)
    return args


def test_workload_is_seeded_and_shares_long_system_prompts():
    a = ray_affinity.make_workload(4, 300, 40, 10, seed=3)
    assert a == ray_affinity.make_workload(4, 300, 40, 10, seed=3)
    assert a != ray_affinity.make_workload(4, 300, 40, 10, seed=4)
    systems = {msgs[0]["content"] for _, msgs in a}
    assert len(systems) == 4 and min(len(s) for s in systems) > 1000
    assert len({msgs[1]["content"] for _, msgs in a}) == 40  # every user turn its own


def test_app_config_is_a_valid_serve_ray_plan():
    for router, kwargs in (("default", {}), ("prefix", {"imbalance_threshold": 5})):
        cfg = ray_affinity.app_config(_args(imbalance_threshold=5), router, 8123)
        plan = plan_from_mapping(cfg)
        (model,) = plan.models
        assert (plan.port, model.spec.num_replicas, model.spec.request_router) == (8123, 2, router)
        assert model.spec.request_router_kwargs == kwargs
        assert model.child_config["enable_prefix_caching"] is True


def test_counters_are_read_per_replica_from_the_merged_metrics():
    child = ("# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.\n"
             "# TYPE vllm:prefix_cache_hits counter\n"
             'vllm:prefix_cache_hits_total{model_name="m"} %d\n'
             'vllm:prefix_cache_hits_created{model_name="m"} 1.7e9\n'
             "# TYPE vllm:prefix_cache_queries counter\n"
             'vllm:prefix_cache_queries_total{model_name="m"} %d\n'
             "# TYPE vllm:request_success counter\n"
             'vllm:request_success_total{finished_reason="stop",model_name="m"} 2\n'
             'vllm:request_success_total{finished_reason="length",model_name="m"} %d\n')
    text = merge([("r1", child % (30, 100, 5)), ("r2", child % (0, 50, 1))])
    got = ray_affinity.parse_counters(text)
    assert got == {"r1": {"hits": 30, "queries": 100, "requests": 7},
                   "r2": {"hits": 0, "queries": 50, "requests": 3}}
    before = {"r1": {"hits": 10, "queries": 40, "requests": 1}}
    side = ray_affinity.summarize_side("prefix", [{"ok": True, "ttft": 0.1, "latency": 0.5,
                                                   "output_tokens": 4}],
                                       2.0, ray_affinity._delta(before, got), 30.0)
    assert side["prefix_cache_hits"] == 20 and side["prefix_cache_queries"] == 110
    assert side["per_replica"]["r1"] == {"hits": 20, "queries": 60, "requests": 6}
    assert side["request_throughput"] == 0.5 and side["median_ttft_ms"] == 100.0
