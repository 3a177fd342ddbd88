"""Shared by the CPU kernel benches: their shape flags and alternating timed rounds (CLI process)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping


def add_kernel_shape_args(p: argparse.ArgumentParser, *, rounds: int, linear: bool) -> None:
    """The model shape (SmolLM2-135M's by default: its attention, and with `linear` its hidden,
    MLP and vocabulary sizes), rounds, label and output flags of the CPU kernel benches."""
    if linear:
        p.add_argument("--hidden-size", type=int, default=576)
        p.add_argument("--intermediate-size", type=int, default=1536)
        p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--num-heads", type=int, default=9)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=rounds, help="alternating timed rounds per side")
    p.add_argument("--model-name", default="SmolLM2-135M shape",
                   help="the label the JSON carries as its model")
    p.add_argument("--output-json", default=None)


def alternating_rounds(timers: Mapping[str, Callable[[], float]],
                       rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each timer, the timers taking turns round by round so machine noise
    hits them alike; an extra first round warms every side up and is not kept."""
    times: dict[str, list[float]] = {name: [] for name in timers}
    for round_index in range(rounds + 1):
        for name, timer in timers.items():
            elapsed = timer()
            if round_index:
                times[name].append(elapsed)
    return times
