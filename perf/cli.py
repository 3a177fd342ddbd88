"""`fornax bench ...` argument parsing and dispatch; also `python -m fornax.perf` (CLI process)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

SUBCOMMANDS = ("throughput", "latency", "serve", "compare", "embed", "sampler", "structured",
               "asr", "realtime", "decode-floor", "modes", "cpu-linear",
               "cpu-attention", "ray-affinity", "many-models", "memory")


def _as_exit_code(func: Any) -> Any:
    """Wrap a subcommand's `run(args)` so that `args.func(args)` returns a process exit code."""

    def call(args: argparse.Namespace) -> int:
        setup_logging()  # the host CLI may not have configured logging; progress goes to stderr
        result = func(args)
        return result if isinstance(result, int) else 0

    return call


def add_bench_subcommands(subparsers: Any) -> None:
    """Register throughput, latency, serve and compare on an argparse subparsers object."""
    from fornax.perf import (
        bench_asr,
        bench_realtime,
        compare,
        cpu_attention,
        cpu_linear,
        embed,
        gpu_decode_floor,
        gpu_modes,
        latency,
        many_models,
        quant_linear,
        ray_affinity,
        resident_memory,
        sampler,
        serve,
        structured,
        throughput,
    )

    for module in (throughput, latency, serve, compare, embed, sampler, structured, bench_asr,
                   bench_realtime, gpu_decode_floor, gpu_modes, cpu_linear, cpu_attention,
                   quant_linear, ray_affinity, many_models, resident_memory):
        parser = module.add_parser(subparsers)
        parser.set_defaults(func=_as_exit_code(parser.get_default("func")))


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Hook for `fornax`'s main CLI: adds `bench` with its sub-subcommands.

    Each leaf sets `func`; `sys.exit(args.func(args))` runs it and returns its exit code."""
    bench = subparsers.add_parser(
        "bench", help="benchmarks and the perf-regression check",
        description="Benchmarks (throughput, latency, serve) writing tagged JSON, and `compare` "
                    "for the regression check. See perf/README.md.")
    inner = bench.add_subparsers(dest="bench_command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    inner.required = True
    add_bench_subcommands(inner)
    return bench


def setup_logging(verbose: bool = False) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fornax.perf [bench] {throughput,latency,serve,compare} ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="python -m fornax.perf",
                                     description="fornax benchmarks (same as `fornax bench`)")
    sub = parser.add_subparsers(dest="bench_command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True
    add_bench_subcommands(sub)
    args = parser.parse_args(argv)
    setup_logging()
    return int(args.func(args))
