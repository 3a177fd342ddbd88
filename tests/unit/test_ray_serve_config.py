"""fornax serve-ray without a Ray cluster: the YAML's `deployment:` checks (fuzzed), the plan of a
config, the merged /metrics text and the engine-load autoscaling arithmetic."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings

from fornax.ray_serve.autoscaling import desired_replicas
from fornax.ray_serve.config import DEPLOYMENT_KEYS, deployment_spec, plan_from_mapping
from fornax.ray_serve.metrics import label_sample, merge
from fornax.runtime.errors import ConfigError
from fornax.runtime.limits import MAX_RAY_QUEUED, MAX_RAY_REPLICAS
from helpers.api_server import REPO_ROOT, tiny_model_path
from helpers.fuzzing.ray_deployment import deployment_sections


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(deployment_sections())
def test_fuzzed_deployment_sections_are_refused_naming_the_key_or_kept_in_bounds(section):
    try:
        spec = deployment_spec("deployment", section)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("deployment"), exc
        # the key it refuses is named (both, when they exclude each other)
        assert any(f"deployment.{k}" in message for k in section) or "not both" in message, exc
        return
    assert set(section) <= set(DEPLOYMENT_KEYS)
    assert 1 <= spec.num_replicas <= MAX_RAY_REPLICAS
    assert 1 <= spec.max_ongoing_requests <= MAX_RAY_QUEUED
    assert -1 <= spec.max_queued_requests <= MAX_RAY_QUEUED
    assert spec.request_router in ("default", "prefix")
    for value in spec.ray_actor_options.values():
        assert not isinstance(value, float) or (math.isfinite(value) and value >= 0)
    if spec.autoscaling is not None:
        scaling = spec.autoscaling
        assert scaling.get("min_replicas", 1) <= scaling["max_replicas"] <= MAX_RAY_REPLICAS


@pytest.mark.parametrize("section, named", [
    ({"num_replicas": 0}, "deployment.num_replicas"),
    ({"num_replicas": True}, "deployment.num_replicas"),
    ({"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}, "not both"),
    ({"autoscaling_config": {"min_replicas": 1}}, "deployment.autoscaling_config.max_replicas"),
    ({"autoscaling_config": {"max_replicas": 2, "target_ongoing_requests": 0}},
     "deployment.autoscaling_config.target_ongoing_requests"),
    ({"autoscaling_config": {"max_replicas": 2, "metric": "gpu"}},
     "deployment.autoscaling_config.metric"),
    ({"max_queued_requests": -2}, "deployment.max_queued_requests"),
    ({"ray_actor_options": {"num_gpus": -1}}, "deployment.ray_actor_options.num_gpus"),
    ({"ray_actor_options": {"resources": {"TPU": "x"}}},
     "deployment.ray_actor_options.resources.TPU"),
    ({"ray_actor_options": {"runtime_env": {}}}, "deployment.ray_actor_options.runtime_env"),
    ({"request_router": "random"}, "deployment.request_router"),
    ({"health_check_period_s": math.inf}, "deployment.health_check_period_s"),
    ({"user_config": {}}, "deployment.user_config"),
])
def test_bad_deployment_values_are_named(section, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        deployment_spec("deployment", section)


def test_plan_merges_a_models_own_deployment_over_the_top_one():
    tiny = str(tiny_model_path("llama"))
    plan = plan_from_mapping({
        "max_model_len": 256, "port": 8123, "api_key": "k",
        "deployment": {"num_replicas": 2, "max_ongoing_requests": 4},
        "models": [{"model": tiny, "served_model_name": "a",
                    "deployment": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}},
                   {"model": tiny, "served_model_name": "b", "max_model_len": 128}]})
    assert plan.port == 8123 and [m.names[0] for m in plan.models] == ["a", "b"]
    first, second = plan.models
    assert first.spec.autoscaling == {"min_replicas": 1, "max_replicas": 3}
    assert first.spec.max_ongoing_requests == 4 and second.spec.num_replicas == 2
    assert second.spec.autoscaling is None
    # each child gets the top flags with its entry's over them, never host/port/deployment
    assert second.child_config == {"max_model_len": 128, "api_key": "k", "model": tiny,
                                   "served_model_name": "b"}
    assert first.deployment != second.deployment


@pytest.mark.parametrize("mapping, named", [
    ({"max_model_len": 256}, "needs `model:`"),
    ({"model": "m", "max_model_lenn": 3}, "max_model_lenn"),
    ({"model": "m", "idle_timeout": 30}, "idle_timeout"),
    ({"model": "m", "port": 0}, "port"),
    ({"model": "m", "uds": "/tmp/x.sock"}, "uds"),
    ({"model": "m", "ssl_keyfile": "k.pem", "ssl_certfile": "c.pem"}, "ssl_keyfile"),
    ({"models": [{"model": "m", "ssl_certfile": "c.pem"}]}, r"models\[0\]\.ssl_certfile"),
    ({"models": [{"model": "m", "deployment": {"replicas": 2}}]},
     r"models\[0\]\.deployment\.replicas"),
])
def test_bad_configs_are_named(mapping, named):
    with pytest.raises(ConfigError, match=named):
        plan_from_mapping(mapping)


def test_serve_ray_exits_2_naming_the_bad_key(tmp_path):
    config = tmp_path / "ray.yaml"
    config.write_text("model: m\ndeployment:\n  num_replicas: 2\n  max_queued: 3\n")
    run = subprocess.run([sys.executable, "-m", "fornax.api.cli", "serve-ray", str(config)],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "deployment.max_queued" in run.stderr


def test_metrics_merge_labels_every_sample_and_keeps_one_header_per_family():
    one = ('# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n'
           'vllm:num_requests_running{model_name="tiny"} 2.0\n'
           '# HELP vllm:e2e Latency.\n# TYPE vllm:e2e histogram\n'
           'vllm:e2e_bucket{le="1.0",model_name="tiny"} 1.0\nvllm:e2e_count{model_name="tiny"} 1.0\n')
    two = one.replace("2.0", "5.0")
    text = merge([("r1", one), ("r2", two)])
    lines = text.splitlines()
    assert lines.count("# TYPE vllm:num_requests_running gauge") == 1
    assert 'vllm:num_requests_running{replica="r1",model_name="tiny"} 2.0' in lines
    assert 'vllm:num_requests_running{replica="r2",model_name="tiny"} 5.0' in lines
    # a family's samples stay together under its header, both replicas' buckets included
    start = lines.index("# TYPE vllm:e2e histogram")
    assert [line.split("{")[0] for line in lines[start + 1:]] == [
        "vllm:e2e_bucket", "vllm:e2e_count", "vllm:e2e_bucket", "vllm:e2e_count"]
    assert label_sample("up 1", 'a"b') == 'up{replica="a\\"b"} 1'
    assert label_sample("x{} 1", "r") == 'x{replica="r"} 1'


def test_engine_load_policy_takes_the_larger_of_engine_load_and_rays_count():
    assert desired_replicas([3.0, 5.0], 0.0, 2.0, 2, 4.0) == 4.0  # the engines hold more
    assert desired_replicas([1.0], 3.0, 2.0, 1, 0.0) == 2.0  # waiting in Ray's queue counts
    assert desired_replicas([], 0.0, 2.0, 1, 6.0) == 3.0  # no report yet: Ray's ongoing count
    assert desired_replicas([0.2], 0.0, 1.0, 1, 3.0) == 3.0  # in flight before the engine
    assert desired_replicas([0.0, 0.0], 0.0, 2.0, 2, 0.0) == 0.0


@pytest.mark.slow  # imports Ray Serve (several seconds)
def test_build_app_for_serve_run_reads_the_same_file(tmp_path):
    from ray.serve import Application

    from fornax.ray_serve.app import build_app, deployment_options

    config = tmp_path / "ray.yaml"
    config.write_text(f"model: {tiny_model_path('llama')}\nserved_model_name: tiny\n"
                      "deployment:\n  autoscaling_config: {min_replicas: 1, max_replicas: 2}\n")
    assert isinstance(build_app({"config": str(config)}), Application)
    with pytest.raises(ConfigError, match="config="):
        build_app({})
    spec = plan_from_mapping({"model": "m", "deployment": {
        "autoscaling_config": {"max_replicas": 2, "metric": "ongoing_requests"},
        "ray_actor_options": {"num_gpus": 2, "resources": {"accel": 1}}}}).models[0].spec
    options = deployment_options(spec)
    assert "policy" not in options["autoscaling_config"]  # Ray's own policy
    assert options["ray_actor_options"] == {"num_gpus": 2.0, "resources": {"accel": 1.0}}
