"""A seeded short fuzzing campaign against real `fornax serve` processes (tiny llama, tiny BERT
embedder and classifier, Whisper tiny.en): every route, streaming and not, multipart audio and the
realtime WebSocket; no 5xx but 503 + Retry-After (501 where the model cannot serve the route),
errors in the route's shape, engines alive, nothing left in the engines afterwards.

`make fuzz` (tools/fuzz_server.py) runs the same campaign at 10,000+ cases."""

from __future__ import annotations

import json

import pytest

from helpers.fuzzing.campaign import leftovers, run_campaign
from helpers.fuzzing.fleet import Fleet
from helpers.fuzzing.realtime import run_realtime
from helpers.fuzzing.routes import ASR, ROUTE_NAMES

pytestmark = pytest.mark.slow  # four servers and a 500-case campaign
SEED = 20261207
CASES = 500
REALTIME_SESSIONS = 20


@pytest.fixture(scope="module")
def fleet(fuzz_fleet: Fleet) -> Fleet:
    """The session's fuzzed servers (tests/api/conftest.py): test_fuzz_storm's abort storm runs
    on its tiny llama afterwards instead of starting another one."""
    return fuzz_fleet


def _report(findings: list[dict]) -> str:
    return "\n\n".join(f"{f['route']} -> {f['status']} x{f['count']}: {f['problem']}\n"
                       f"{f['case']}\n{f['traceback']}" for f in findings)


def test_short_campaign_keeps_every_invariant(fleet):
    stats = run_campaign(fleet, CASES, SEED)
    left = leftovers(fleet)
    summary = stats.summary(fleet, left)
    assert summary["cases"] == CASES
    assert set(ROUTE_NAMES) <= set(summary["cases_per_route"]), "some routes got no case"
    assert summary["distinct_findings"] == [], _report(summary["distinct_findings"])
    assert summary["engine_deaths"] == 0 and summary["engine_restarts"] == 0
    assert summary["leaked_blocks"] == 0 and summary["requests_left"] == 0, json.dumps(left)
    assert all(v["kv_cache_usage_perc"] == 0.0 for v in left.values()), json.dumps(left)
    for kind in fleet.kinds:
        assert fleet.dead(kind) is None and fleet.health(kind) == 200


def test_realtime_event_fuzz(fleet):
    stats = run_realtime(fleet.url(ASR), REALTIME_SESSIONS, SEED)
    assert stats.sessions == REALTIME_SESSIONS and stats.frames > REALTIME_SESSIONS
    assert stats.problems == [], "\n".join(stats.problems)
    assert fleet.dead(ASR) is None and fleet.health(ASR) == 200
    left = fleet.leftovers(ASR)
    assert left["requests"] == 0 and left["leaked_blocks"] == 0, left


def test_every_recorded_finding_keeps_the_invariants(fleet):
    import asyncio

    from helpers.fuzzing.client import new_client, send
    from helpers.fuzzing.regressions import regression_cases

    async def run() -> list[str]:
        failed = []
        async with new_client() as client:
            for what, case in regression_cases():
                out = await send(client, fleet.url(case.server), case)
                why = out.problem or fleet.dead(case.server)
                if why:
                    failed.append(f"{what}: {why}; HTTP {out.status} {out.body[:300]!r}")
        return failed

    failed = asyncio.run(run())
    assert failed == [], "\n".join(failed)
    for kind in fleet.kinds:
        assert fleet.dead(kind) is None and fleet.health(kind) == 200
