"""Shared benchmark plumbing: run metadata (device, commit, date), JSON output, stats, tables (CLI process)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fornax.runtime import env

logger = logging.getLogger(__name__)

# Bump on any change that breaks a reader of the JSON (renamed/removed keys, changed meanings).
# Adding keys is not a break. perf/README.md documents every version.
SCHEMA_VERSION = 1
TOOL_NAME = "fornax-bench"
PERCENTILES: tuple[int, ...] = (90, 99)  # the median is always reported too
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- run metadata --------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name ("Intel(R) Xeon(R) ..."), or the platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_names() -> list[str]:
    """Names of visible NVIDIA GPUs; asks torch only if it is already imported, else nvidia-smi."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            return []
        except Exception:  # noqa: BLE001 - a broken driver must not break a CPU benchmark
            return []
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def device_info() -> dict[str, Any]:
    """Where the benchmark ran: CPU and GPU names, core and thread counts, library versions."""
    torch = sys.modules.get("torch")
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "gpu": gpu_names(),
        "num_cpus": os.cpu_count() or 0,
        "omp_num_threads": env.OMP_NUM_THREADS.raw(),
        "torch_num_threads": torch.get_num_threads() if torch is not None else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None) if torch is not None else None,
    }
    gpus = info["gpu"]
    info["name"] = gpus[0] if gpus else info["cpu"]
    return info


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """`{"sha": ..., "dirty": bool}` of the checkout holding this code; "unknown" outside git."""
    env_sha = env.BENCH_COMMIT.get()  # CI may pin it (e.g. an installed wheel)
    if env_sha:
        return {"sha": env_sha, "dirty": None}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        # results are data, not code: a run writing perf/results/ does not dirty the next one
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                 ".", ":(exclude)perf/results"],
                                cwd=repo, capture_output=True, text=True, timeout=10,
                                check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"sha": "unknown", "dirty": None}
    return {"sha": sha or "unknown", "dirty": bool(status.strip())}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_record(kind: str, model: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The tagged envelope every benchmark JSON starts from (see perf/README.md)."""
    commit = git_commit()
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": TOOL_NAME,
        "kind": kind,
        "date": utc_now(),
        "commit": commit["sha"],
        "commit_dirty": commit["dirty"],
        "device": device_info(),
        "model": model,
        "config": {k: jsonable(v) for k, v in config.items()},
        "startup": {},
        "metrics": {},
        "details": {},
        "peer": None,
        "ratios": {},
    }


def jsonable(value: Any) -> Any:
    """Argparse values to plain JSON (paths to str, tuples to lists)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def write_json(record: Mapping[str, Any], path: str | os.PathLike[str] | None) -> None:
    """Write the record (device/commit refreshed at the end so torch's view is included)."""
    if not path:
        return
    out = Path(path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    logger.info("wrote %s", out)


def finish(record: dict[str, Any], path: str | os.PathLike[str] | None,
           report: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The end of a bench run: write the record's JSON (when asked), print its report, return it."""
    write_json(record, path)
    report(record)
    return record


def check_threads() -> None:
    """PERF.md: thread counts must be explicit; warn once when OMP_NUM_THREADS is unset."""
    if not env.OMP_NUM_THREADS.is_set():
        logger.warning("OMP_NUM_THREADS is not set; timings depend on the default thread count "
                       "(set it explicitly, e.g. OMP_NUM_THREADS=%d)", os.cpu_count() or 1)


def int_list(spec: str | int) -> list[int]:
    """A comma-separated list of whole numbers ("1,8,32"), blanks skipped, order kept."""
    return [int(x) for x in str(spec).split(",") if x.strip()]


# ---- statistics ----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values: Sequence[float], prefix: str, unit: str = "",
              percentiles: Iterable[int] = PERCENTILES) -> dict[str, float]:
    """`{prefix_mean, prefix_median, prefix_std, prefix_pNN...}` (unit appended as a suffix)."""
    suffix = f"_{unit}" if unit else ""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n) if n else math.nan
    out = {f"mean_{prefix}{suffix}": mean, f"median_{prefix}{suffix}": percentile(values, 50),
           f"std_{prefix}{suffix}": std}
    for p in percentiles:
        out[f"p{p}_{prefix}{suffix}"] = percentile(values, p)
    return out


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


# ---- tables --------------------------------------------------------------------------------------
def fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.1f}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None,
                 title: str | None = None) -> str:
    """A plain text table (first column left-aligned, the others right-aligned)."""
    cells = [[fmt_value(c) for c in row] for row in rows]
    head = [str(h) for h in headers] if headers else None
    all_rows = ([head] if head else []) + cells
    if not all_rows:
        return ""
    widths = [max(len(r[i]) for r in all_rows if i < len(r)) for i in range(len(all_rows[0]))]
    lines: list[str] = []
    total = sum(widths) + 3 * (len(widths) - 1)
    if title:
        lines.append(f"{'=' * total}\n{title.center(total)}\n{'=' * total}")
    for idx, row in enumerate(all_rows):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("   ".join(parts).rstrip())
        if head and idx == 0:
            lines.append("-" * total)
    return "\n".join(lines)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None,
                title: str | None = None) -> None:
    print(format_table(rows, headers, title), flush=True)


def print_comparison(record: Mapping[str, Any], names: Iterable[str], title: str, *,
                     startup: Iterable[str] = (), extra: Iterable[list[Any]] = (),
                     ours: str = "fornax", theirs: str | None = None) -> None:
    """Print `names` from the record's metrics, then its `startup <key>` rows and `extra` rows;
    with a peer, its value and the speedup beside each (the peer's column named `theirs`, by
    default the peer's name)."""
    metrics, peer = record["metrics"], record.get("peer")
    rows: list[list[Any]] = []
    for name in names:
        row: list[Any] = [name, metrics.get(name)]
        if peer:
            row += [peer["metrics"].get(name), record["ratios"].get(name, "")]
        rows.append(row)
    for key in startup:
        rows.append([f"startup {key}", record["startup"][key]]
                    + ([peer["startup"][key], ""] if peer else []))
    rows += extra
    headers = ["metric", ours] + ([theirs or peer["name"], "speedup"] if peer else [])
    print_table(rows, headers, title)


def progress(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr (or a no-op stand-in when disabled)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


# ---- metric directions ---------------------------------------------------------------------------
_HIGHER_MARKERS = ("throughput", "per_s", "goodput")
_LOWER_SUFFIXES = ("_ms", "_s")


def higher_is_better(name: str) -> bool | None:
    """True for rates (tok/s, req/s, goodput), False for times (`*_ms`, `*_s`), None if unknown."""
    if any(marker in name for marker in _HIGHER_MARKERS):
        return True
    if name.endswith(_LOWER_SUFFIXES):
        return False
    return None


def set_ratios(record: dict[str, Any], names: Iterable[str]) -> None:
    """record["ratios"]: fornax's speedup over the peer on each of `names` the peer measured."""
    peer = record["peer"]["metrics"]
    record["ratios"] = {k: speedup(k, record["metrics"][k], peer[k]) for k in names if k in peer}


def speedup(name: str, ours: float, peer: float) -> float:
    """How many times better fornax is than the peer on `name` (> 1: fornax wins)."""
    better_up = higher_is_better(name)
    try:
        return ours / peer if better_up is not False else peer / ours
    except ZeroDivisionError:
        return math.nan
