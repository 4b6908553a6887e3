"""The worker's dispatch primitives: `Slots` (the limit on running entries)."""

from __future__ import annotations

import anyio
import pytest

from rsaga.runtime.dispatch import Slots


async def test_slots_never_let_more_than_total_run_and_serve_waiters_in_order() -> None:
    slots = Slots(3)
    running, most, order = 0, 0, []

    async def run(n: int) -> None:
        nonlocal running, most
        async with slots:
            order.append(n)
            running += 1
            most = max(most, running)
            await anyio.sleep(0.001 * (n % 4))
            running -= 1

    async with anyio.create_task_group() as tg:
        for n in range(40):
            tg.start_soon(run, n)
    assert most == 3
    assert order == list(range(40))  # first come, first served
    assert slots.taken == 0


async def test_a_waiter_cancelled_leaves_no_slot_taken() -> None:
    slots = Slots(1)
    release = anyio.Event()
    entered: list[str] = []

    async def hold() -> None:
        async with slots:
            entered.append("holder")
            await release.wait()

    async def wait(name: str) -> None:
        async with slots:
            entered.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.sleep(0.01)
        async with anyio.create_task_group() as doomed:
            doomed.start_soon(wait, "cancelled")
            await anyio.sleep(0.01)
            doomed.cancel_scope.cancel()  # gives up waiting
        tg.start_soon(wait, "later")
        await anyio.sleep(0.01)
        release.set()
    assert entered == ["holder", "later"]
    assert slots.taken == 0


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    slots = Slots(1)
    entered: list[str] = []

    async def wait(name: str) -> None:
        async with slots:
            entered.append(name)

    await slots.__aenter__()
    async with anyio.create_task_group() as tg, anyio.create_task_group() as doomed:
        doomed.start_soon(wait, "doomed")
        await anyio.sleep(0.01)
        tg.start_soon(wait, "next")
        await anyio.sleep(0.01)
        await slots.__aexit__(None, None, None)  # hands the slot to "doomed"...
        doomed.cancel_scope.cancel()  # ...cancelled as it wakes: it may run or not
    assert entered[-1] == "next"  # either way the slot was not lost
    assert slots.taken == 0


def test_slots_need_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Slots(0)
