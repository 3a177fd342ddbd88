"""An abort storm (streams cut at random points: chat and completions, n > 1, short and long
prompts) and an overload burst (64 concurrent requests against an in-flight bound of 8) on a real
`fornax serve`: nothing leaks, the engine lives, admitted requests finish, the rest get 503 with
Retry-After, and the server's memory stays bounded. `make fuzz` runs the full sizes."""

from __future__ import annotations

import asyncio

import pytest

from helpers.fuzzing.fleet import Fleet
from helpers.fuzzing.routes import GEN
from helpers.fuzzing.storm import abort_storm, overload_burst

pytestmark = pytest.mark.slow  # two servers, a 100-stream storm and a burst
STREAMS = 100
BURST = 64
QUEUE_BOUND = 8
RSS_GROWTH_LIMIT = 512 << 20  # generous: a leak per request would pass it within a few bursts


@pytest.fixture(scope="module")
def fleets(fuzz_fleet: Fleet):
    """A server with the default admission bounds (the storm: the session's fuzzed tiny llama,
    tests/api/conftest.py) and one bounded to 8 requests in flight (the burst)."""
    burst = Fleet((GEN,), {GEN: ("--max-num-queued-requests", str(QUEUE_BOUND),
                                 "--max-num-seqs", "4")}).launch()
    try:
        yield fuzz_fleet, burst.wait()
    finally:
        burst.stop()


def test_abort_storm_leaks_nothing(fleets):
    fleet = fleets[0]
    result = asyncio.run(abort_storm(fleet.url(GEN), STREAMS, seed=5))
    assert result.streams == STREAMS and result.errors == [], result.errors
    assert result.cut > STREAMS // 2, result  # most streams were cut, not finished
    left = fleet.leftovers(GEN)
    assert left["requests"] == 0 and left["leaked_blocks"] == 0, left
    assert left["kv_cache_usage_perc"] == 0.0, left
    assert fleet.dead(GEN) is None and fleet.health(GEN) == 200


def test_overload_burst_finishes_the_admitted_and_refuses_the_rest(fleets):
    fleet = fleets[1]
    before = fleet.rss_bytes(GEN)
    result = asyncio.run(overload_burst(fleet.url(GEN), BURST))
    assert result.incomplete == [] and result.other == {}, result
    assert result.ok + result.overloaded == BURST
    assert result.ok >= 1 and result.overloaded >= 1, result
    grown = fleet.rss_bytes(GEN) - before
    assert grown < RSS_GROWTH_LIMIT, f"the server grew by {grown >> 20} MiB in one burst"
    left = fleet.leftovers(GEN)
    assert left["requests"] == 0 and left["leaked_blocks"] == 0, left
    assert fleet.dead(GEN) is None and fleet.health(GEN) == 200
