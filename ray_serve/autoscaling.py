"""The autoscaling policy on fornax's own load signal: the engines' running + waiting requests
that each replica reports (`record_autoscaling_stats`), plus the requests queued in front of the
replicas (Ray Serve controller process; plain Python, run by Ray's autoscaler)."""

from __future__ import annotations

import logging
from typing import Any

from fornax.ray_serve.replica import LOAD_METRIC

logger = logging.getLogger(__name__)

POLICY = "fornax.ray_serve.autoscaling:engine_load_policy"


def desired_replicas(engine_loads: list[float], queued: float, target: float, current: int,
                     ongoing: float) -> float:
    """Replicas wanted so that each holds `target` requests: the larger of the engines' load
    plus what waits in Ray's queues, and Ray's own count of ongoing requests (the engines also
    count what Ray does not see, such as realtime sessions; Ray's count covers a request
    between the replica and its engine, and a replica that has not reported yet)."""
    if current == 0:
        return 0.0
    return max(sum(engine_loads) + queued, ongoing) / target


def engine_load_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Ray Serve's custom autoscaling policy entry point (`AutoscalingContext` in, the desired
    replica count out; Ray applies min/max, the up/down delays and the scaling factors)."""
    metrics = ctx.aggregated_metrics or {}
    loads = [float(v) for v in (metrics.get(LOAD_METRIC) or {}).values()]
    target = ctx.config.get_target_ongoing_requests()
    desired = desired_replicas(loads, float(ctx.total_queued_requests or 0.0), target,
                               ctx.current_num_replicas, float(ctx.total_num_requests))
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    return desired, {}
