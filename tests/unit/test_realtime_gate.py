"""The realtime sessions' decode gate (api/realtime/gate.py): finals first, partial decodes
limited across sessions and let through in arrival order, a cancelled waiter leaves no trace."""

from __future__ import annotations

import asyncio

import pytest

from fornax.api.realtime.gate import DecodeGate


def test_finals_first_partials_limited_in_arrival_order() -> None:
    async def run() -> None:
        gate = DecodeGate(max_partials=2)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("a", "b", "c", "d", "e")}

        async def partial(name: str) -> None:
            async with gate.partial():
                order.append(name)
                await release[name].wait()

        tasks = {n: asyncio.create_task(partial(n)) for n in ("a", "b", "c")}
        await asyncio.sleep(0)
        assert order == ["a", "b"] and gate.partials == 2 and gate.waiting == 1
        final_done = asyncio.Event()

        async def final() -> None:
            async with gate.final():
                order.append("final")
                await final_done.wait()

        f = asyncio.create_task(final())
        await asyncio.sleep(0)
        assert order[-1] == "final"  # a final never waits for partial decodes
        tasks["d"] = asyncio.create_task(partial("d"))
        release["a"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "final"]  # a slot is free, but a final is in flight
        final_done.set()
        await f
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "final", "c"]  # the oldest waiter first, one free slot
        tasks["e"] = asyncio.create_task(partial("e"))
        await asyncio.sleep(0)
        tasks["d"].cancel()  # d gives up while waiting: e takes the next slot
        with pytest.raises(asyncio.CancelledError):
            await tasks["d"]
        release["b"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "final", "c", "e"] and gate.waiting == 0
        for name in ("c", "e"):
            release[name].set()
        await asyncio.gather(*(t for n, t in tasks.items() if n != "d"))
        assert gate.partials == 0 and gate.finals == 0

    asyncio.run(run())


def test_one_session_never_waits() -> None:
    async def run() -> None:
        gate = DecodeGate(max_partials=2)
        for _ in range(3):
            async with gate.partial():
                assert gate.partials == 1
        async with gate.final():
            assert gate.finals == 1
        assert gate.partials == gate.finals == 0

    asyncio.run(run())
