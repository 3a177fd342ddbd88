"""Summarise a py-spy raw profile into file:function shares (inclusive and self) for a region (tool)."""

from __future__ import annotations

import argparse
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from fornax.perf.common import print_table

logger = logging.getLogger(__name__)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def frame_key(frame: str, lines: bool = False) -> str:
    """`func (path/file.py:123)` -> `path/file.py:func` (`path/file.py:func:123` with `lines`)."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    key = f"{match['file']}:{match['func']}"
    return f"{key}:{match['line']}" if lines and match["line"] else key


def load_stacks(path: str | Path, region: str | None,
                lines: bool = False) -> list[tuple[list[str], int]]:
    """(frames root-first, samples) per py-spy `--format raw` line; with `region`, only the
    stacks through a frame whose key contains it, cut to start at that frame."""
    stacks = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_key(f, lines) for f in stack.split(";")]
        if region:
            idx = next((i for i, f in enumerate(frames) if region in f), None)
            if idx is None:
                continue
            frames = frames[idx:]
        stacks.append((frames, int(count)))
    return stacks


def summarize_profile(stacks: list[tuple[list[str], int]]) -> tuple[int, Counter[str], Counter[str]]:
    """(total samples, inclusive samples per frame, self samples per frame)."""
    total = sum(n for _, n in stacks)
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frames, n in stacks:
        for key in set(frames):
            inclusive[key] += n
        if frames:
            own[frames[-1]] += n
    return total, inclusive, own


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fornax.perf.profile_summary",
        description="Where the time goes, from `py-spy record -f raw -o prof.txt -- CMD`.")
    parser.add_argument("raw", help="py-spy raw (collapsed stacks) file")
    parser.add_argument("--region", default=None,
                        help="only count stacks through this frame (e.g. 'timed_generate')")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--filter", default=None, help="only list frames whose key contains this")
    parser.add_argument("--lines", action="store_true", help="keep line numbers (file:func:line)")
    args = parser.parse_args(argv)
    total, inclusive, own = summarize_profile(load_stacks(args.raw, args.region, args.lines))
    if not total:
        print("no samples matched")
        return 1

    def rows(counter: Counter[str]) -> list[list[object]]:
        items = [(k, v) for k, v in counter.most_common() if not args.filter or args.filter in k]
        return [[k, v, f"{100.0 * v / total:.1f}%"] for k, v in items[:args.top]]

    region = f" under {args.region}" if args.region else ""
    print_table(rows(inclusive), ["file:function", "samples", "inclusive"],
                f"{total} samples{region}: inclusive")
    print_table(rows(own), ["file:function", "samples", "self"], f"{total} samples{region}: self")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
