"""Builds the Ray Serve application from a plan (`build_app` for `serve run`) and runs it for
`fornax serve-ray CONFIG.yaml` (driver process)."""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from typing import Any

from fornax.ray_serve.config import (
    PREFIX_ROUTER,
    AppPlan,
    DeploymentSpec,
    load_plan,
    plan_from_mapping,
)
from fornax.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

APP_NAME = "fornax"
INGRESS_MAX_ONGOING = 100_000  # the ingress only waits on model handles: their bounds apply
_RETRY_FLOOR_S = 5.0


def deployment_options(spec: DeploymentSpec) -> dict[str, Any]:
    """Ray Serve's `.options(...)` of one model deployment."""
    options: dict[str, Any] = {
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "ray_actor_options": dict(spec.ray_actor_options),
        "health_check_period_s": spec.health_check_period_s,
        "health_check_timeout_s": spec.health_check_timeout_s,
        "graceful_shutdown_timeout_s": spec.graceful_shutdown_timeout_s,
    }
    if spec.autoscaling is not None:
        scaling = dict(spec.autoscaling)
        if spec.metric == "engine_load":
            from fornax.ray_serve.autoscaling import POLICY

            scaling["policy"] = {"policy_function": POLICY}
        options["autoscaling_config"] = scaling
    else:
        options["num_replicas"] = spec.num_replicas
    if spec.request_router == "prefix":
        module = PREFIX_ROUTER.rpartition(".")[0]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"request_router: prefix needs {module} ({exc})") from None
        options["request_router_config"] = {"request_router_class": PREFIX_ROUTER,
                                            "request_router_kwargs": spec.request_router_kwargs}
    return options


def retry_window_s(spec: DeploymentSpec) -> float:
    """How long the ingress retries a request that no replica's child took (a child died and
    Ray has not yet replaced its replica): two health checks and some slack."""
    return max(_RETRY_FLOOR_S, 2 * spec.health_check_period_s + 2.0)


def application(plan: AppPlan) -> Any:
    """The Ray Serve application (`Application`) of a plan: one deployment per model and the
    ingress in front of them."""
    from ray import serve

    from fornax.ray_serve.ingress import Ingress
    from fornax.ray_serve.replica import ModelReplica

    models = []
    for model in plan.models:
        deployment = serve.deployment(name=model.deployment,
                                      **deployment_options(model.spec))(ModelReplica)
        models.append((model.names, deployment.bind(model.child_config,
                                                    model.spec.startup_timeout_s),
                       retry_window_s(model.spec)))
    ingress = serve.deployment(name="ingress", num_replicas=1,
                               max_ongoing_requests=INGRESS_MAX_ONGOING,
                               ray_actor_options={"num_cpus": 0})(Ingress)
    keys: list[str] = []  # the config's api_key (a model's own too): the ingress checks it
    for model in plan.models:
        given = model.child_config.get("api_key")
        for key in given if isinstance(given, list) else [given] if given else []:
            if isinstance(key, str) and key not in keys:
                keys.append(key)
    return ingress.bind(models, keys)


def build_app(args: dict[str, Any]) -> Any:
    """`serve run fornax.ray_serve.app:build_app config=CONFIG.yaml`: the application of that
    file (`config` may also be the mapping itself)."""
    config = args.get("config")
    if isinstance(config, dict):
        return application(plan_from_mapping(config))
    if not isinstance(config, str) or not config:
        raise ConfigError("build_app: pass config=CONFIG.yaml (fornax serve-ray's file)")
    return application(load_plan(config))


def serve_ray(config_path: str, address: str | None) -> int:
    """`fornax serve-ray`: start (or join, with `address`) a Ray cluster, run the application
    on Ray Serve's HTTP proxy at the file's host:port, block until SIGINT/SIGTERM, then remove
    it (and stop Serve and Ray when this command started them)."""
    plan = load_plan(config_path)
    app = application(plan)
    import ray
    from ray import serve

    ray.init(address=address, include_dashboard=False if address is None else None,
             logging_level=logging.WARNING)
    stop = threading.Event()
    running = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()
        if not running.is_set():  # serve.run still waits for the replicas: stop waiting
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": plan.host, "port": plan.port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        running.set()
        logger.info("fornax on Ray Serve: %d model(s) at http://%s:%d", len(plan.models),
                    plan.host, plan.port)
        while not stop.wait(1.0):
            pass
        logger.info("stopping the fornax application")
    except KeyboardInterrupt:
        logger.info("stopped while the fornax application was starting")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if address is None:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
    return 0
