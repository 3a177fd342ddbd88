"""`fornax bench compare`: ratios of headline metrics between runs, regression exit code, plot (CLI process)."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from fornax.perf.common import SCHEMA_VERSION, higher_is_better, print_table, write_json
from fornax.perf.schema import validate_record

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2

HEADLINE_BY_KIND: dict[str, tuple[str, ...]] = {
    "throughput": ("requests_per_s", "output_throughput", "total_token_throughput"),
    "latency": ("median_latency_s", "p99_latency_s", "mean_ttft_ms", "mean_tpot_ms"),
    "serve": ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
              "median_tpot_ms", "median_itl_ms", "median_e2el_ms", "request_goodput"),
    "embed": ("sentences_per_s", "tokens_per_s"),
}
# config keys that may differ between a baseline and a new run without making them incomparable
_VOLATILE_CONFIG = {"output_json", "disable_tqdm", "func", "bench_command", "command"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="compare benchmark JSONs; non-zero exit on a regression",
        description="Compare the headline metrics of NEW against BASE (the first and last file); "
                    "files in between only join the --plot history. Exit 1 when a metric is "
                    "worse than BASE by more than --threshold, 2 on unusable input.")
    p.add_argument("runs", nargs="+", metavar="RUN.json", help="BASE.json [OLDER.json ...] NEW.json")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="allowed relative loss per metric (0.05 = 5%%)")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="metric names to check (default: the kind's headline metrics)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw the history of all runs")
    p.add_argument("--output-json", default=None, help="write the comparison table as JSON")
    p.set_defaults(func=run)
    return p


def load_record(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or "metrics" not in data or "kind" not in data:
        raise ValueError(f"{path} is not a fornax bench result (no 'kind'/'metrics')")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {version}; this tool reads {SCHEMA_VERSION}")
    errors = validate_record(data, check_metrics=False)
    if errors:
        raise ValueError(f"{path} does not match the result schema: {'; '.join(errors[:3])}")
    return data


def comparable_metrics(record: dict[str, Any], names: list[str] | None) -> dict[str, float]:
    """Headline metrics plus the side-by-side speedups vs a peer (`speedup_vs_<peer>:<metric>`)."""
    wanted = names or list(HEADLINE_BY_KIND.get(record["kind"], ())) or [
        k for k in record["metrics"] if higher_is_better(k) is not None]  # a kind new to compare
    out = {k: float(record["metrics"][k]) for k in wanted
           if isinstance(record["metrics"].get(k), (int, float))}
    peer = record.get("peer") or {}
    for key, value in (record.get("ratios") or {}).items():
        if isinstance(value, (int, float)) and (names is None or key in names):
            out[f"speedup_vs_{peer.get('name', 'peer')}:{key}"] = float(value)
    return out


def _direction(name: str) -> bool | None:
    return True if name.startswith("speedup_vs_") else higher_is_better(name)


def compare_records(base: dict[str, Any], new: dict[str, Any], threshold: float,
                    names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per metric in both runs: values, ratio new/base, direction, verdict."""
    base_m, new_m = comparable_metrics(base, names), comparable_metrics(new, names)
    rows = []
    for name in [k for k in base_m if k in new_m]:
        b, n = base_m[name], new_m[name]
        up = _direction(name)
        ratio = n / b if b else (math.inf if n else 1.0)
        if up is None:
            status = "info"
        elif (up and ratio < 1 - threshold) or (not up and ratio > 1 + threshold):
            status = "REGRESSION"
        elif (up and ratio > 1 + threshold) or (not up and ratio < 1 - threshold):
            status = "improved"
        else:
            status = "ok"
        rows.append({"metric": name, "base": b, "new": n, "ratio": ratio,
                     "higher_is_better": up, "status": status})
    return rows


def _warn_mismatch(base: dict[str, Any], new: dict[str, Any]) -> list[str]:
    notes = []
    if base["kind"] != new["kind"]:
        notes.append(f"kinds differ: {base['kind']} vs {new['kind']}")
    if base.get("device", {}).get("name") != new.get("device", {}).get("name"):
        notes.append("devices differ: a ratio across machines says little")
    b_threads = base.get("device", {}).get("omp_num_threads")
    n_threads = new.get("device", {}).get("omp_num_threads")
    if b_threads != n_threads:
        notes.append(f"OMP_NUM_THREADS differs: {b_threads} vs {n_threads}")
    if base.get("model") != new.get("model"):
        notes.append(f"models differ: {base.get('model')} vs {new.get('model')}")
    bc, nc = base.get("config", {}), new.get("config", {})
    diff = sorted(k for k in set(bc) | set(nc) if k not in _VOLATILE_CONFIG and bc.get(k) != nc.get(k))
    if diff:
        notes.append("config differs in: " + ", ".join(diff))
    return notes


def run(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        logger.error("compare needs BASE.json and NEW.json")
        return EXIT_BAD_INPUT
    try:
        records = [load_record(p) for p in args.runs]
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_BAD_INPUT
    base, new = records[0], records[-1]
    for note in _warn_mismatch(base, new):
        logger.warning("%s", note)
    if base["kind"] != new["kind"]:
        return EXIT_BAD_INPUT
    rows = compare_records(base, new, args.threshold, args.metrics)
    if not rows:
        logger.error("no metric in common between %s and %s", args.runs[0], args.runs[-1])
        return EXIT_BAD_INPUT
    arrow = {True: "higher", False: "lower", None: "?"}
    print_table([[r["metric"], r["base"], r["new"], f"{r['ratio']:.3f}",
                  arrow[r["higher_is_better"]], r["status"]] for r in rows],
                ["metric", "base", "new", "new/base", "better", "status"],
                f"compare ({base['kind']}): {base.get('commit', '?')[:10]} -> "
                f"{new.get('commit', '?')[:10]}, threshold {args.threshold:.0%}")
    regressions = [r["metric"] for r in rows if r["status"] == "REGRESSION"]
    if args.output_json:
        write_json({"schema_version": SCHEMA_VERSION, "tool": "fornax-bench", "kind": "compare",
                    "base": args.runs[0], "new": args.runs[-1], "threshold": args.threshold,
                    "rows": rows, "regressions": regressions}, args.output_json)
    if args.plot:
        plot_history(records, [str(p) for p in args.runs], args.plot, args.metrics)
    if regressions:
        print(f"REGRESSION beyond {args.threshold:.0%}: {', '.join(regressions)}")
        return EXIT_REGRESSION
    print(f"no regression beyond {args.threshold:.0%}")
    return EXIT_OK


def _label(record: dict[str, Any], path: str) -> str:
    commit = str(record.get("commit") or "?")[:7]
    date = str(record.get("date") or "")[:10]
    return f"{commit}\n{date}" if commit not in ("unknown", "?") else Path(path).stem


def plot_history(records: list[dict[str, Any]], paths: list[str], out: str | Path,
                 names: list[str] | None = None) -> Path:
    """One panel per headline metric, runs in the order given (oldest first), PNG via Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [comparable_metrics(r, names) for r in records]
    metrics = [m for m in series[-1] if any(m in s for s in series[:-1])] or list(series[-1])
    cols = min(3, max(len(metrics), 1))
    rows = math.ceil(len(metrics) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    labels = [_label(r, p) for r, p in zip(records, paths)]
    for ax, name in zip(axes.flat, metrics):
        xs = [i for i, s in enumerate(series) if name in s]
        ax.plot(xs, [series[i][name] for i in xs], marker="o")
        ax.set_title(name + {True: " (higher is better)", False: " (lower is better)",
                             None: ""}[_direction(name)], fontsize=8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"fornax bench {records[-1]['kind']}: {records[-1].get('model', '')}", fontsize=9)
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", out_path)
    return out_path
