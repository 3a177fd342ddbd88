"""`make fuzz`: the long fuzzing campaign against real `fornax serve` processes, then the full abort
storm and overload burst; writes a JSON summary to perf/results/ (a CLI tool, fuzzer process).

Run as `python -m tools.fuzz_server [--cases N] [--seed S] [--time-limit SECONDS]` from the
repository root. Exits 1 when any invariant broke (the summary lists each distinct finding).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fornax.runtime import env

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

logger = logging.getLogger("fornax.fuzz")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.fuzz_server", description=__doc__)
    p.add_argument("--cases", type=int, default=10_000, help="HTTP cases (default 10,000)")
    p.add_argument("--seed", type=int, default=int(time.strftime("%Y%m%d")),
                   help="the campaign's seed (default: today's date)")
    p.add_argument("--time-limit", type=float, default=3600.0,
                   help="stop the HTTP campaign after this many seconds (default 3600)")
    p.add_argument("--realtime-sessions", type=int, default=300)
    p.add_argument("--storm", type=int, default=1000, help="streams cut in the abort storm")
    p.add_argument("--burst", type=int, default=1000,
                   help="concurrent requests in the overload burst")
    p.add_argument("--queue-bound", type=int, default=32,
                   help="--max-num-queued-requests of the burst's server")
    p.add_argument("--no-audio", action="store_true", help="leave Whisper out")
    p.add_argument("--out", type=Path, default=None,
                   help="the summary file (default perf/results/fuzz-<seed>.json)")
    return p.parse_args(argv)


def _whisper_installed() -> bool:
    from fornax.runtime.errors import ModelLoadError
    from fornax.runtime.loaders.speech_models import resolve_speech_model

    try:
        return resolve_speech_model("whisper-tiny.en") is not None
    except ModelLoadError:
        return False


def run_http(args: argparse.Namespace) -> dict[str, Any]:
    from helpers.fuzzing.campaign import leftovers, run_campaign
    from helpers.fuzzing.fleet import Fleet
    from helpers.fuzzing.realtime import run_realtime
    from helpers.fuzzing.routes import ASR, CLS, EMBED, GEN, MANY

    audio = not args.no_audio and _whisper_installed()
    fleet = Fleet((GEN, EMBED, CLS, MANY, ASR) if audio else (GEN, EMBED, CLS, MANY)).start()
    try:
        stats = run_campaign(fleet, args.cases, args.seed, time_limit_s=args.time_limit)
        realtime: dict[str, Any] = {"sessions": 0}
        if audio and args.realtime_sessions:
            rt = run_realtime(fleet.url(ASR), args.realtime_sessions, args.seed)
            realtime = {"sessions": rt.sessions, "frames": rt.frames, "events": rt.events,
                        "closes": rt.closes, "problems": rt.problems[:50],
                        "engine_alive": fleet.dead(ASR) is None}
        summary = stats.summary(fleet, leftovers(fleet))
        summary["realtime"] = realtime
        summary["audio_covered"] = audio
        return summary
    finally:
        fleet.stop()


def run_storms(args: argparse.Namespace) -> dict[str, Any]:
    from helpers.fuzzing.fleet import Fleet
    from helpers.fuzzing.routes import GEN
    from helpers.fuzzing.storm import abort_storm, overload_burst

    storm_fleet = Fleet((GEN,)).launch()
    burst_fleet = Fleet((GEN,), {GEN: ("--max-num-queued-requests", str(args.queue_bound),
                                       "--max-num-seqs", "8")}).launch()
    try:
        storm_fleet.wait()
        burst_fleet.wait()
        storm = asyncio.run(abort_storm(storm_fleet.url(GEN), args.storm, seed=args.seed))
        storm_left = storm_fleet.leftovers(GEN)
        rss_before = burst_fleet.rss_bytes(GEN)
        burst = asyncio.run(overload_burst(burst_fleet.url(GEN), args.burst))
        rss_after = burst_fleet.rss_bytes(GEN)
        return {
            "abort_storm": {"streams": storm.streams, "cut": storm.cut, "finished": storm.finished,
                            "statuses": storm.statuses, "errors": storm.errors[:20],
                            "leftovers": storm_left,
                            "engine_alive": storm_fleet.dead(GEN) is None},
            "overload_burst": {"requests": args.burst, "queue_bound": args.queue_bound,
                               "ok": burst.ok, "overloaded_503": burst.overloaded,
                               "other": burst.other, "incomplete": burst.incomplete[:20],
                               "rss_before_mib": rss_before >> 20,
                               "rss_after_mib": rss_after >> 20,
                               "leftovers": burst_fleet.leftovers(GEN),
                               "engine_alive": burst_fleet.dead(GEN) is None},
        }
    finally:
        storm_fleet.stop()
        burst_fleet.stop()


def failures(summary: dict[str, Any]) -> list[str]:
    out = [f"{f['route']} -> {f['status']}: {f['problem']}" for f in summary["distinct_findings"]]
    out += [f"realtime: {p}" for p in summary["realtime"].get("problems", [])]
    for key in ("engine_deaths", "leaked_blocks", "requests_left"):
        if summary[key]:
            out.append(f"{key} = {summary[key]}")
    storm, burst = summary["abort_storm"], summary["overload_burst"]
    if storm["errors"] or storm["leftovers"]["leaked_blocks"] or storm["leftovers"]["requests"] \
            or not storm["engine_alive"]:
        out.append(f"abort storm: {storm}")
    if burst["incomplete"] or burst["other"] or burst["leftovers"]["requests"] \
            or not burst["engine_alive"]:
        out.append(f"overload burst: {burst}")
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not env.OMP_NUM_THREADS.is_set():
        env.OMP_NUM_THREADS.set("1")
    args = _parse(argv)
    started = time.monotonic()
    summary = run_http(args)
    summary.update(run_storms(args))
    summary["total_duration_s"] = round(time.monotonic() - started, 1)
    summary["failures"] = failures(summary)
    out = args.out or REPO_ROOT / "perf" / "results" / f"fuzz-{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("%d cases in %.0f s: %d unexpected 5xx, %d engine deaths, %d leaked blocks; "
                "summary in %s", summary["cases"], summary["total_duration_s"],
                summary["unexpected_5xx"], summary["engine_deaths"], summary["leaked_blocks"], out)
    for line in summary["failures"]:
        logger.error("FAILED: %s", line[:2000])
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
