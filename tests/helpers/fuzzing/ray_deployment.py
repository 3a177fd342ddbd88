"""Fuzzed `deployment:` sections of `fornax serve-ray`'s YAML: known and unknown keys with any
JSON-like values, for the refusal test of fornax.ray_serve.config (test process)."""

from __future__ import annotations

from hypothesis import strategies as st

from helpers.fuzzing.values import any_json, edge_ints, edge_text

_KEYS = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
         "ray_actor_options", "request_router", "request_router_kwargs", "health_check_period_s",
         "health_check_timeout_s", "graceful_shutdown_timeout_s", "startup_timeout_s",
         "num_replica", "replicas", "", "user_config")
_SCALING_KEYS = ("min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
                 "upscale_delay_s", "downscale_delay_s", "look_back_period_s", "metric",
                 "upscaling_factor", "policy", "max")
_ACTOR_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "runtime_env")


def _value() -> st.SearchStrategy[object]:
    return st.one_of(any_json(), edge_ints(), edge_text(),
                     st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from(["default", "prefix", "engine_load", "ongoing_requests",
                                      -1, 0, 1, 2.5, True, None]))


def deployment_sections() -> st.SearchStrategy[dict[str, object]]:
    """A `deployment:` mapping: keys known and not, nested sections fuzzed the same way."""
    scaling = st.dictionaries(st.sampled_from(_SCALING_KEYS), _value(), max_size=5)
    actor = st.dictionaries(st.sampled_from(_ACTOR_KEYS),
                            st.one_of(_value(), st.dictionaries(edge_text(), _value(),
                                                                max_size=3)), max_size=3)
    value = st.one_of(_value(), scaling, actor)
    return st.dictionaries(st.sampled_from(_KEYS), value, max_size=6)
