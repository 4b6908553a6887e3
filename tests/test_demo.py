"""`rsaga demo`, small, on embedded fakeredis: the README's first command must work."""

from __future__ import annotations

import itertools
import time
from typing import Any

import anyio
import pytest
from rsaga_examples.demo import (
    DemoOrders,
    DemoTravel,
    demo_deadline,
    plan,
    run_demo,
    settle_time,
)
from rsaga_examples.orders import (
    WORLD_EVENTS,
    InventoryService,
    OrderFulfilment,
    OrderPlaced,
    PaymentService,
    ShippingService,
)
from rsaga_examples.travel import (
    SERVICES,
    TRAVEL_EVENTS,
    CarService,
    FlightService,
    HotelService,
    TravelBooking,
    TripRequested,
)

from rsaga import EventRegistry, EventStore, Executor, Keyspace
from rsaga.config import WorkerSettings
from rsaga.processes import ProcessCompensated, ProcessCompleted, ProcessFailed
from rsaga.scheduler import Scheduler
from rsaga.testing import Driver, fake_redis, fake_store
from rsaga.worker import Worker

INSTALLED = (
    OrderFulfilment, PaymentService, InventoryService, ShippingService,
    TravelBooking, HotelService, FlightService, CarService,
)


def test_the_plan_expects_what_its_inputs_call_for() -> None:
    orders, trips, outcomes = plan(50, 50, failure_rate=0.3, timeout_rate=0.2, seed=1)
    expected = {o.id: o.expected for o in outcomes if o.kind == "order"}
    for order in orders:
        assert expected[order.order_id] == {
            "ok": "completed", "decline": "failed", "silent": "timed out"
        }[order.payment]
    kinds = {o.expected for o in outcomes if o.kind == "trip"}
    assert kinds == {"completed", "compensated", "timed out"}
    assert len(trips) == 50


async def test_the_demo_ends_every_process_as_expected() -> None:
    lines: list[str] = []
    report = await run_demo(
        fake_redis(), orders=8, trips=8, failure_rate=0.4, timeout_rate=0.0, seed=7,
        progress=lines.append,
    )
    assert report.ok, "\n".join(report.lines())
    actual = {o.actual for o in report.outcomes}
    assert {"completed", "failed", "compensated"} <= actual
    assert lines  # progress was shown
    assert report.lines()[-1] == "result: OK, every process ended as expected"


async def test_progress_shows_from_the_first_second_and_keeps_coming() -> None:
    start = time.monotonic()
    seen: list[float] = []
    await run_demo(
        fake_redis(), orders=100, trips=100, seed=3, deadline=2.0,
        progress=lambda line: seen.append(time.monotonic() - start),
    )
    assert seen[0] < 1.0
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(gaps) < 1.0


STEP = 0.25
"""Seconds the manual clock moves at a time: an end is seen up to this late."""


async def _ended_after(driver: Driver, stream: str) -> float:
    """Virtual seconds until the process on `stream` ends, advancing `driver`'s clock."""
    elapsed = 0.0
    while elapsed < 3600:
        events = (await driver.store.read(stream)).events
        ended = ProcessCompleted | ProcessFailed | ProcessCompensated
        if events and isinstance(events[-1].data, ended):
            return elapsed - STEP
        await driver.advance(STEP)
        elapsed += STEP
    raise AssertionError(f"{stream} never ended")


@pytest.mark.parametrize("orders", [OrderFulfilment, DemoOrders])
async def test_the_deadline_covers_an_order_whose_payment_never_answers(orders: Any) -> None:
    driver = Driver(fake_store(WORLD_EVENTS), [orders(), InventoryService(), ShippingService()])
    await driver.store.append("order-1", [OrderPlaced("1", 10, payment="silent")])
    await driver.run_until_idle()
    took = await _ended_after(driver, "order-fulfilment-1")
    assert took > 0.8 * settle_time(orders)  # the estimate is not wildly generous either
    assert took <= settle_time(orders) < demo_deadline(orders, DemoTravel)


@pytest.mark.parametrize("trips", [TravelBooking, DemoTravel])
async def test_the_deadline_covers_a_trip_whose_last_service_never_answers(trips: Any) -> None:
    driver = Driver(fake_store(TRAVEL_EVENTS), [trips(), HotelService(), FlightService(),
                                                 CarService()])
    await driver.store.append("trip-1", [TripRequested("1", silent=SERVICES[-1])])
    await driver.run_until_idle()
    took = await _ended_after(driver, "travel-booking-1")
    assert took <= settle_time(trips) < demo_deadline(DemoOrders, trips)


async def test_drive_only_reads_the_installed_definitions_processes() -> None:
    redis = fake_redis()
    prefix = "deployment"
    workers_store = EventStore(redis, EventRegistry(), keyspace=Keyspace(prefix=prefix))
    stop = anyio.Event()
    notices: list[str] = []
    async with anyio.create_task_group() as elsewhere:
        worker = Worker(
            Executor(workers_store), [cls() for cls in INSTALLED],
            settings=WorkerSettings(concurrency=16, block_ms=100, shutdown_timeout=1),
        )
        elsewhere.start_soon(worker.run, stop)
        elsewhere.start_soon(Scheduler(redis, workers_store.keyspace, max_sleep=0.2).run, stop)
        await anyio.sleep(0.5)  # heartbeats written
        report = await run_demo(
            redis, orders=4, trips=4, failure_rate=0.5, timeout_rate=0.0, seed=5,
            prefix=prefix, drive_only=True, definitions=INSTALLED,
            progress=lambda line: None, notice=notices.append,
        )
        stop.set()
    assert report.ok, "\n".join(report.lines())
    assert notices == []


async def test_drive_only_says_within_5s_that_no_worker_or_scheduler_is_alive() -> None:
    start = time.monotonic()
    notices: list[tuple[float, str]] = []
    report = await run_demo(
        fake_redis(), orders=2, trips=0, timeout_rate=0.0, prefix="nobody-home",
        drive_only=True, definitions=INSTALLED, deadline=5.0,
        progress=lambda line: None,
        notice=lambda line: notices.append((time.monotonic() - start, line)),
    )
    assert not report.ok
    [(at, line)] = notices
    assert at < 5.0
    assert "no live worker running order-fulfilment" in line
    assert "scheduler" in line
    assert "'nobody-home'" in line
