"""The seeded campaign: hypothesis draws batches of cases, sends them concurrently, checks every
invariant, restarts a server whose engine died and keeps the statistics (fuzzer process)."""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from helpers.fuzzing import cases as cases_module
from helpers.fuzzing.cases import Case, case
from helpers.fuzzing.client import NO_RESPONSE, TIMED_OUT, Outcome, new_client, send
from helpers.fuzzing.fleet import Fleet, tracebacks

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[3]
HEALTH_EVERY = 25  # batches between /health checks


@dataclass
class Finding:
    signature: str
    route: str
    status: int
    problem: str
    case: str
    traceback: str = ""
    count: int = 1


@dataclass
class Stats:
    seed: int
    cases: int = 0
    per_route: collections.Counter = field(default_factory=collections.Counter)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    route_statuses: dict[str, collections.Counter] = field(default_factory=dict)
    unexpected_5xx: int = 0
    problems: int = 0
    timeouts: int = 0
    findings: dict[str, Finding] = field(default_factory=dict)
    response_ids: list[str] = field(default_factory=list)
    engine_deaths: int = 0
    repeats: int = 0  # generated cases skipped as repeats of earlier ones
    started: float = field(default_factory=time.monotonic)

    def record(self, c: Case, out: Outcome, log: str) -> None:
        self.cases += 1
        route = c.target.name
        self.per_route[route] += 1
        self.statuses[str(out.status)] += 1
        self.route_statuses.setdefault(route, collections.Counter())[str(out.status)] += 1
        if out.response_id:
            self.response_ids.append(out.response_id)
        if out.status == TIMED_OUT:
            self.timeouts += 1
        if out.problem is None:
            return
        self.problems += 1
        if out.status >= 500:
            self.unexpected_5xx += 1
        traces = tracebacks(log)
        trace = traces[-1] if traces else ""
        last = trace.strip().splitlines()[-1] if trace else ""
        sig = f"{route}|{out.status}|{_norm(out.problem)}|{_norm(last)}"
        self.add_finding(Finding(sig, route, out.status, out.problem, c.describe(), trace))

    def add_finding(self, finding: Finding) -> None:
        known = self.findings.get(finding.signature)
        if known is not None:
            known.count += 1
        else:
            self.findings[finding.signature] = finding
            logger.warning("fuzz finding: %s %s: %s\n%s\n%s", finding.route, finding.status,
                           finding.problem, finding.case[:1500], finding.traceback[-2500:])

    def summary(self, fleet: Fleet, leftovers: dict[str, Any]) -> dict[str, Any]:
        return {
            "seed": self.seed, "commit": commit(), "duration_s": round(time.monotonic()
                                                                       - self.started, 1),
            "cases": self.cases, "cases_per_route": dict(sorted(self.per_route.items())),
            "status_histogram": dict(sorted(self.statuses.items())),
            "status_per_route": {r: dict(sorted(c.items()))
                                 for r, c in sorted(self.route_statuses.items())},
            "unexpected_5xx": self.unexpected_5xx, "invariant_violations": self.problems,
            "timeouts": self.timeouts, "repeats_skipped": self.repeats,
            "engine_deaths": self.engine_deaths,
            "engine_restarts": sum(m.restarts for m in fleet.members.values()),
            "leaked_blocks": sum(int(v.get("leaked_blocks", 0)) for v in leftovers.values()),
            "requests_left": sum(int(v.get("requests", 0)) for v in leftovers.values()),
            "servers": leftovers,
            "distinct_findings": [{"route": f.route, "status": f.status, "problem": f.problem,
                                   "count": f.count, "case": f.case[:1500],
                                   "traceback": f.traceback[-3000:]}
                                  for f in self.findings.values()],
        }


def _norm(text: str) -> str:
    return re.sub(r"[0-9a-f]{8,}|\d+", "N", text)[:120]


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, check=False,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                               check=False)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


async def _send_batch(fleet: Fleet, cases: list[Case]) -> list[Outcome]:
    async with new_client() as client:
        return list(await asyncio.gather(*(send(client, fleet.url(c.server), c) for c in cases)))


def run_batch(fleet: Fleet, stats: Stats, cases: list[Case], batch_no: int) -> None:
    outcomes = asyncio.run(_send_batch(fleet, cases))
    kinds = sorted({c.server for c in cases})
    logs = {k: fleet.new_log(k) for k in kinds}
    for c, out in zip(cases, outcomes):
        stats.record(c, out, logs[c.server])
    for kind in kinds:
        why = fleet.dead(kind)
        if why is None and batch_no % HEALTH_EVERY == 0 and fleet.health(kind) != 200:
            why = "/health is not 200 with the engine process alive"
        if why is not None:
            stats.engine_deaths += 1
            mine = [c for c in cases if c.server == kind]
            traces = tracebacks(logs[kind] + fleet.new_log(kind))
            stats.add_finding(Finding(
                f"dead|{kind}|{_norm(traces[-1].splitlines()[-1]) if traces else why}",
                ",".join(c.target.name for c in mine), 0, f"{kind} server: {why}",
                "\n".join(c.describe() for c in mine), traces[-1] if traces else ""))
            fleet.restart(kind)


def run_campaign(fleet: Fleet, num_cases: int, seed_value: int, batch: int = 4,
                 time_limit_s: float | None = None) -> Stats:
    """At least `num_cases` cases (fewer only when `time_limit_s` runs out), `batch` at a time."""
    stats = Stats(seed_value)
    kinds = tuple(fleet.kinds)
    cases_module.restart_count()  # the same seed builds the same cases in any process
    # hypothesis may repeat an example: repeats are skipped and the
    # campaign stops at `num_cases` distinct cases, so it asks for more examples than that.
    examples = 3 * -(-num_cases // batch) // 2 + 10
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    counter = [0]
    seen: set[int] = set()

    @seed(seed_value)
    @settings(max_examples=examples, database=None, deadline=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(st.lists(case(kinds, stats.response_ids), min_size=batch, max_size=batch))
    def one_batch(cases: list[Case]) -> None:
        if stats.cases >= num_cases or (deadline is not None and time.monotonic() > deadline):
            return
        fresh = []
        for c in cases:
            key = hash((c.server, c.target.name, c.path, c.body, tuple(sorted(c.headers.items())),
                        c.cut_after, c.truncate))
            if key not in seen:
                seen.add(key)
                fresh.append(c)
        stats.repeats += len(cases) - len(fresh)
        if fresh:
            counter[0] += 1
            run_batch(fleet, stats, fresh[:num_cases - stats.cases], counter[0])
            if counter[0] % 250 == 0:
                logger.info("fuzz: %d cases, %d findings, %.0f s", stats.cases,
                            len(stats.findings), time.monotonic() - stats.started)

    one_batch()
    return stats


def leftovers(fleet: Fleet) -> dict[str, dict[str, float]]:
    return {kind: fleet.leftovers(kind) for kind in fleet.kinds}


__all__ = ["NO_RESPONSE", "Stats", "leftovers", "run_campaign"]
