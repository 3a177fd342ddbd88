"""`fornax serve-ray`'s YAML: the `fornax serve --config` mapping plus a `deployment:` section,
read and checked into one plan per model (driver process; imports no Ray).

The file is `fornax serve --config`'s (flags by name, `model:` or a `models:` list) with
`deployment:` at the top (every model's) and/or inside a `models:` entry (that model's, its keys
over the top one's). `host`/`port` are Ray Serve's HTTP proxy; each replica's `fornax serve`
child gets every other flag, on a free localhost port. Every key and value is checked here: a bad
one is a ConfigError (exit 2) naming it.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from fornax.runtime.errors import ConfigError
from fornax.runtime.limits import MAX_RAY_QUEUED, MAX_RAY_REPLICAS

logger = logging.getLogger(__name__)

PREFIX_ROUTER = "fornax.ray_serve.prefix_router.PrefixAffinityRouter"
ROUTERS = ("default", "prefix")
METRICS = ("engine_load", "ongoing_requests")  # what autoscaling counts per replica
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
# flags of a many-model `fornax serve` with no meaning here (replicas are never unloaded)
_REFUSED = {"max_loaded_models": "autoscaling_config.min_replicas",
            "idle_timeout": "autoscaling_config (min_replicas: 0 and downscale delays)"}
# flags that would make a replica's child unreachable on its plain-HTTP localhost port
_NOT_FOR_CHILD = {"uds": "the application listens on host/port (Ray Serve's proxy)",
                  "ssl_keyfile": "terminate TLS in front of Ray Serve's proxy",
                  "ssl_certfile": "terminate TLS in front of Ray Serve's proxy"}

_MAX_S = 7 * 24 * 3600.0  # any delay or timeout of the section


def _count(where: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: an integer from {low} to {high} is expected, got {value!r}")
    return value


def _number(where: str, value: Any, low: float, high: float, *, open_low: bool = False) -> float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value > low if open_low else value >= low)
          and value <= high)
    if not ok:
        bound = f"over {low}" if open_low else f"from {low}"
        raise ConfigError(f"{where}: a number {bound} to {high} is expected, got {value!r}")
    return float(value)


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a mapping is expected, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be names, got {key!r}")
    return value


@dataclass
class DeploymentSpec:
    """One model deployment's Ray Serve settings (checked)."""

    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = None  # Ray's autoscaling_config keys, checked
    metric: str = "engine_load"  # what autoscaling counts (METRICS)
    max_ongoing_requests: int = 32
    max_queued_requests: int = 256  # -1: unbounded (Ray's default; not advised)
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1.0})
    request_router: str = "default"
    request_router_kwargs: dict[str, Any] = field(default_factory=dict)
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0
    startup_timeout_s: float = 600.0  # a replica waits this long for its child's /health


_AUTOSCALING_INTS = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0}
_AUTOSCALING_FLOATS = {  # name -> (low, open low)
    "target_ongoing_requests": (0.0, True), "upscale_delay_s": (0.0, False),
    "downscale_delay_s": (0.0, False), "downscale_to_zero_delay_s": (0.0, False),
    "look_back_period_s": (0.0, True), "upscaling_factor": (0.0, True),
    "downscaling_factor": (0.0, True)}
_ACTOR_FLOATS = ("num_cpus", "num_gpus", "memory")


def _autoscaling(where: str, raw: Any) -> tuple[dict[str, Any], str]:
    raw = _mapping(where, raw)
    out: dict[str, Any] = {}
    metric = "engine_load"
    for key, value in raw.items():
        at = f"{where}.{key}"
        if key in _AUTOSCALING_INTS:
            out[key] = _count(at, value, _AUTOSCALING_INTS[key], MAX_RAY_REPLICAS)
        elif key in _AUTOSCALING_FLOATS:
            low, open_low = _AUTOSCALING_FLOATS[key]
            out[key] = _number(at, value, low, _MAX_S, open_low=open_low)
        elif key == "metric":
            if value not in METRICS:
                raise ConfigError(f"{at}: one of {', '.join(METRICS)} is expected, got {value!r}")
            metric = value
        else:
            raise ConfigError(f"{at}: unknown key (known: "
                              f"{', '.join([*_AUTOSCALING_INTS, *_AUTOSCALING_FLOATS, 'metric'])})")
    low, high = out.get("min_replicas", 1), out.get("max_replicas", 1)
    if "max_replicas" not in out:
        raise ConfigError(f"{where}.max_replicas: required")
    if low > high:
        raise ConfigError(f"{where}.min_replicas ({low}) is over max_replicas ({high})")
    start = out.get("initial_replicas")
    if start is not None and not low <= start <= high:
        raise ConfigError(f"{where}.initial_replicas ({start}) is outside "
                          f"min_replicas..max_replicas ({low}..{high})")
    return out, metric


def _actor_options(where: str, raw: Any) -> dict[str, Any]:
    raw = _mapping(where, raw)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        at = f"{where}.{key}"
        if key in _ACTOR_FLOATS:
            out[key] = _number(at, value, 0.0, 1e15)
        elif key == "resources":  # custom resources, e.g. {"GPU_A100": 2}
            out[key] = {name: _number(f"{at}.{name}", amount, 0.0, 1e15)
                        for name, amount in _mapping(at, value).items()}
        elif key == "accelerator_type":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{at}: a Ray accelerator type name is expected")
            out[key] = value
        else:
            raise ConfigError(f"{at}: unknown key (known: {', '.join(_ACTOR_FLOATS)}, "
                              "resources, accelerator_type)")
    return out


def deployment_spec(where: str, raw: dict[str, Any]) -> DeploymentSpec:
    """A `deployment:` mapping (the top one with a model's own keys over it) as a spec."""
    spec = DeploymentSpec()
    if "num_replicas" in raw and "autoscaling_config" in raw:
        raise ConfigError(f"{where}: give num_replicas or autoscaling_config, not both")
    for key, value in raw.items():
        at = f"{where}.{key}"
        if key == "num_replicas":
            spec.num_replicas = _count(at, value, 1, MAX_RAY_REPLICAS)
        elif key == "autoscaling_config":
            spec.autoscaling, spec.metric = _autoscaling(at, value)
        elif key == "max_ongoing_requests":
            spec.max_ongoing_requests = _count(at, value, 1, MAX_RAY_QUEUED)
        elif key == "max_queued_requests":
            spec.max_queued_requests = _count(at, value, -1, MAX_RAY_QUEUED)
        elif key == "ray_actor_options":
            spec.ray_actor_options = _actor_options(at, value)
        elif key == "request_router":
            if value not in ROUTERS:
                raise ConfigError(f"{at}: one of {', '.join(ROUTERS)} is expected, got {value!r}")
            spec.request_router = value
        elif key == "request_router_kwargs":
            spec.request_router_kwargs = _json_safe(at, _mapping(at, value))
        elif key in ("health_check_period_s", "health_check_timeout_s", "startup_timeout_s"):
            setattr(spec, key, _number(at, value, 0.0, _MAX_S, open_low=True))
        elif key == "graceful_shutdown_timeout_s":
            spec.graceful_shutdown_timeout_s = _number(at, value, 0.0, _MAX_S)
        else:
            raise ConfigError(f"{at}: unknown key (known: {', '.join(DEPLOYMENT_KEYS)})")
    if spec.request_router_kwargs:  # the prefix router's knobs (prefix_index.PrefixPolicyConfig)
        from fornax.ray_serve.prefix_index import PrefixPolicyConfig

        if spec.request_router != "prefix":
            raise ConfigError(f"{where}.request_router_kwargs: only with request_router: prefix")
        try:
            PrefixPolicyConfig.from_kwargs(spec.request_router_kwargs)
        except ValueError as exc:
            raise ConfigError(f"{where}.{exc}") from None
    return spec


DEPLOYMENT_KEYS = ("num_replicas", "autoscaling_config", "max_ongoing_requests",
                   "max_queued_requests", "ray_actor_options", "request_router",
                   "request_router_kwargs", "health_check_period_s", "health_check_timeout_s",
                   "graceful_shutdown_timeout_s", "startup_timeout_s")


def _json_safe(where: str, value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(f"{where}.{k}", v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(where, v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise ConfigError(f"{where}: JSON values only, got {value!r}")


@dataclass
class ModelPlan:
    """One model of the application: its deployment, its names and its child's flags."""

    deployment: str  # the Ray Serve deployment name
    names: list[str]  # what a request's `model` may say (served names, then aliases)
    child_config: dict[str, Any]  # the child's `fornax serve --config` mapping
    spec: DeploymentSpec


@dataclass
class AppPlan:
    """What `fornax serve-ray CONFIG.yaml` runs."""

    host: str
    port: int
    models: list[ModelPlan]


def _key(raw: Any) -> str:
    return str(raw).lstrip("-").replace("-", "_")


def _strip(mapping: dict[str, Any]) -> dict[str, Any]:
    return {_key(k): v for k, v in mapping.items()}


def load_plan(path: str) -> AppPlan:
    """Read and check CONFIG.yaml (ConfigError naming the key for anything wrong)."""
    from fornax.api.server.argv import ArgvError, load_config_file

    try:
        raw = _strip(load_config_file(path))
    except ArgvError as exc:
        raise ConfigError(str(exc)) from None
    return plan_from_mapping(raw)


def plan_from_mapping(raw: dict[str, Any]) -> AppPlan:
    """The plan of an already read mapping (`build_app`'s `config` may be a dict too)."""
    raw = _strip(_mapping("config", raw))
    top = _mapping("deployment", raw.pop("deployment", None) or {})
    host = raw.pop("host", None) or DEFAULT_HOST
    port = _count("port", raw.pop("port", DEFAULT_PORT), 1, 65535)
    if not isinstance(host, str):
        raise ConfigError(f"host: a host name or address is expected, got {host!r}")
    for key, instead in _REFUSED.items():
        if raw.get(key) is not None:
            raise ConfigError(f"{key}: not used by fornax serve-ray (replicas are never "
                              f"unloaded); use deployment.{instead}")
    listed = raw.pop("models", None)
    entries: list[dict[str, Any]]
    if listed is not None:
        if not isinstance(listed, list) or not listed:
            raise ConfigError("models: a non-empty list of models is expected")
        entries = []
        for i, item in enumerate(listed):
            item = {"model": item} if isinstance(item, str) else _mapping(f"models[{i}]", item)
            entries.append(_strip(item))
    elif raw.get("model"):
        entries = [{}]
    else:
        raise ConfigError("fornax serve-ray needs `model:` or a `models:` list in the config")
    own = [_mapping(f"models[{i}].deployment", e.pop("deployment", None) or {})
           for i, e in enumerate(entries)]
    for where, flags in [("", raw)] + [(f"models[{i}].", e) for i, e in enumerate(entries)]:
        for key, instead in _NOT_FOR_CHILD.items():
            if flags.get(key) is not None:
                raise ConfigError(f"{where}{key}: not used by fornax serve-ray (each replica "
                                  f"reaches its child over plain HTTP on localhost); {instead}")
    names = _check_with_serve(raw, entries if listed is not None else None)
    plans = []
    for i, (entry, extra, served) in enumerate(zip(entries, own, names, strict=True)):
        where = f"models[{i}].deployment" if listed is not None else "deployment"
        merged = {**top, **extra}
        if "num_replicas" in extra and "autoscaling_config" not in extra:
            merged.pop("autoscaling_config", None)  # a model's own choice wins over the top's
        if "autoscaling_config" in extra and "num_replicas" not in extra:
            merged.pop("num_replicas", None)
        spec = deployment_spec(where, merged)
        child = {**raw, **entry}
        plans.append(ModelPlan(_deployment_name(i, served[0]), served, child, spec))
    return AppPlan(host, port, plans)


def _deployment_name(index: int, name: str) -> str:
    short = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.rstrip("/").rsplit("/", 1)[-1])[:48]
    return f"model{index}-{short or 'model'}"


def _check_with_serve(top: dict[str, Any], entries: list[dict[str, Any]] | None
                      ) -> list[list[str]]:
    """`fornax serve`'s own checks over the flags (every flag known and in bounds, each entry's
    flags valid): each model's names (served, then aliases)."""
    from fornax.api.cli import build_parser
    from fornax.api.server.argv import ArgvError, normalize_serve_argv, subparser
    from fornax.api.server.model_entries import model_entries

    parser = build_parser()
    serve = subparser(parser, "serve")
    mapping = dict(top)
    if entries is not None:
        mapping["models"] = entries
    with tempfile.TemporaryDirectory(prefix="fornax-ray-") as folder:
        file = Path(folder) / "serve.yaml"
        file.write_text(yaml.safe_dump(mapping, sort_keys=False), encoding="utf-8")
        try:
            words = normalize_serve_argv(["--config", str(file)], serve)
        except ArgvError as exc:
            raise ConfigError(str(exc).replace(str(file), "CONFIG")) from None
    try:
        args = serve.parse_args(words)
    except SystemExit:  # argparse printed what it refused
        raise ConfigError("a flag above was refused") from None
    found = model_entries(args, serve)
    if found is None:  # one model
        model = args.model or args.model_flag
        served = list(args.served_model_name or [model])
        return [served + [n for n in [model] if n not in served]]
    return [entry.served + entry.aliases for entry in found]
