"""`rsaga demo`: order fulfilment processes and travel-booking sagas, end to end.

The demo places orders and requests trips, some set up to fail or to time out,
runs a worker and a scheduler (in this process, or elsewhere: `drive_only`),
shows progress, and ends with a summary. It succeeds only if every process
reached the terminal state its inputs call for:

- an order whose payment goes through completes; a declined one fails; one
  whose payment service never answers times out (retries, then fails);
- a trip whose services all book completes; one where a service refuses is
  compensated; one where a service never answers times out and is compensated.

Timeouts are short here (3 s) so the demo runs in seconds.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import msgspec
from redis.asyncio import Redis

from handlers.orders import (
    WORLD_EVENTS,
    InventoryService,
    OrderFulfilment,
    OrderPlaced,
    PaymentService,
    ShippingService,
)
from handlers.travel import (
    SERVICES,
    TRAVEL_EVENTS,
    CarService,
    FlightService,
    HotelService,
    TravelBooking,
    TripRequested,
)
from rsaga.config import WorkerSettings
from rsaga.events import EventRegistry, new_id
from rsaga.executor import Executor
from rsaga.keyspace import Keyspace
from rsaga.processes import (
    FRAMEWORK_EVENTS,
    ProcessCompensated,
    ProcessCompleted,
    ProcessFailed,
    ProcessStarted,
)
from rsaga.retry import ExponentialBackoff, FixedDelay
from rsaga.sagas import SAGA_EVENTS, SagaCompensated, SagaCompleted, StepFailed
from rsaga.scheduler import Scheduler
from rsaga.store import EventStore
from rsaga.worker import Worker


class DemoOrders(OrderFulfilment):
    """Order fulfilment with demo-sized timeouts: 3 s waits, two quick retries."""

    wait_timeout = 3.0
    retry = FixedDelay(interval=0.2, max_retries=2)


class DemoTravel(TravelBooking):
    """Travel booking with demo-sized timeouts: 3 s per reply, quick compensation retries."""

    compensation_retry = ExponentialBackoff(base=0.2, cap=2.0, max_retries=4)
    steps = tuple(msgspec.structs.replace(step, timeout=3.0) for step in TravelBooking.steps)

DEMO_HANDLERS = (
    DemoOrders, PaymentService, InventoryService, ShippingService,
    DemoTravel, HotelService, FlightService, CarService,
)


@dataclass
class Outcome:
    """How one process ended, against how it was expected to end."""

    kind: str
    id: str
    expected: str
    actual: str = "running"
    duration_ms: float = 0.0


@dataclass
class DemoReport:
    """The demo's results."""

    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every process ended as its inputs call for."""
        return all(o.actual == o.expected for o in self.outcomes)

    def lines(self) -> list[str]:
        """The summary table."""
        header = f"{'':<10}{'completed':>11}{'compensated':>13}{'failed':>8}{'timed out':>11}"
        header += f"{'p50 ms':>9}{'p99 ms':>9}{'wrong':>7}"
        out = [header]
        for kind in ("order", "trip"):
            mine = [o for o in self.outcomes if o.kind == kind]
            if not mine:
                continue
            counts = Counter(o.actual for o in mine)
            durations = sorted(o.duration_ms for o in mine) or [0.0]
            p50 = durations[len(durations) // 2]
            p99 = durations[min(len(durations) - 1, int(len(durations) * 0.99))]
            wrong = sum(o.actual != o.expected for o in mine)
            out.append(
                f"{kind + 's':<10}{counts['completed']:>11}{counts['compensated']:>13}"
                f"{counts['failed']:>8}{counts['timed out']:>11}{p50:>9.0f}{p99:>9.0f}{wrong:>7}"
            )
        total = len(self.outcomes)
        rate = total / self.seconds if self.seconds else 0.0
        out.append(f"{total} processes in {self.seconds:.1f}s ({rate:.0f}/s)")
        for o in [o for o in self.outcomes if o.actual != o.expected][:10]:
            out.append(f"  {o.kind} {o.id}: expected {o.expected}, got {o.actual}")
        out.append("result: " + ("OK, every process ended as expected" if self.ok else "FAILED"))
        return out


def demo_store(redis: Redis, prefix: str) -> EventStore:
    """A store whose registry knows every event of the demo."""
    registry = EventRegistry([*WORLD_EVENTS, *TRAVEL_EVENTS, *FRAMEWORK_EVENTS, *SAGA_EVENTS])
    return EventStore(redis, registry, keyspace=Keyspace(prefix=prefix))


def plan(orders: int, trips: int, failure_rate: float, timeout_rate: float, seed: int | None
         ) -> tuple[list[OrderPlaced], list[TripRequested], list[Outcome]]:
    """The inputs, and what each should end as."""
    rng = random.Random(seed)
    run = new_id()[-8:]
    placed, requested, expected = [], [], []
    for n in range(orders):
        roll = rng.random()
        payment = "silent" if roll < timeout_rate else (
            "decline" if roll < timeout_rate + failure_rate else "ok")
        order_id = f"{run}-{n}"
        placed.append(OrderPlaced(order_id, rng.randint(5, 500), payment))
        outcome = {"ok": "completed", "decline": "failed", "silent": "timed out"}[payment]
        expected.append(Outcome("order", order_id, outcome))
    for n in range(trips):
        roll = rng.random()
        trip_id = f"{run}-{n}"
        if roll < timeout_rate:
            trip = TripRequested(trip_id, silent=rng.choice(SERVICES))
            outcome = "timed out"
        elif roll < timeout_rate + failure_rate:
            trip = TripRequested(trip_id, fail_at=rng.choice(SERVICES))
            outcome = "compensated"
        else:
            trip = TripRequested(trip_id)
            outcome = "completed"
        requested.append(trip)
        expected.append(Outcome("trip", trip_id, outcome))
    return placed, requested, expected


async def _observe(store: EventStore, outcome: Outcome) -> None:
    """Fill in how a process ended (if it did) and how long it took."""
    name = DemoOrders.name if outcome.kind == "order" else DemoTravel.name
    events = (await store.read(f"{name}-{outcome.id}")).events
    ended = ProcessCompleted | ProcessFailed | ProcessCompensated
    if not events or not isinstance(events[-1].data, ended):
        return
    started = next(e for e in events if isinstance(e.data, ProcessStarted)).occurred_at
    outcome.duration_ms = (events[-1].occurred_at - started).total_seconds() * 1000
    data = [e.data for e in events]
    if any(isinstance(d, SagaCompleted) for d in data) or isinstance(data[-1], ProcessCompleted):
        outcome.actual = "completed"
    elif any(isinstance(d, SagaCompensated) for d in data):
        timed_out = any(isinstance(d, StepFailed) and d.timed_out for d in data)
        outcome.actual = "timed out" if timed_out else "compensated"
    elif isinstance(data[-1], ProcessFailed):
        reason = data[-1].reason
        outcome.actual = "timed out" if "gave up after" in reason else "failed"


async def run_demo(
    redis: Redis,
    *,
    orders: int = 100,
    trips: int = 100,
    failure_rate: float = 0.2,
    timeout_rate: float = 0.1,
    seed: int | None = None,
    prefix: str = "rsaga-demo",
    drive_only: bool = False,
    deadline: float = 120.0,
    progress: Callable[[str], None] = print,
) -> DemoReport:
    """Run the demo on `redis`; with `drive_only`, workers and a scheduler run elsewhere."""
    store = demo_store(redis, prefix)
    placed, requested, outcomes = plan(orders, trips, failure_rate, timeout_rate, seed)
    report = DemoReport(outcomes)
    stop = anyio.Event()
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        if not drive_only:
            worker = Worker(
                Executor(store),
                [cls() for cls in DEMO_HANDLERS],
                settings=WorkerSettings(concurrency=64, block_ms=200, shutdown_timeout=2),
            )
            tg.start_soon(worker.run, stop)
            tg.start_soon(Scheduler(redis, store.keyspace, max_sleep=0.5).run, stop)
        for order in placed:
            await store.append(f"order-{order.order_id}", [order])
        for trip in requested:
            await store.append(f"trip-{trip.trip_id}", [trip])
        with anyio.move_on_after(deadline):
            while True:
                await anyio.sleep(0.5)
                for outcome in outcomes:
                    if outcome.actual == "running":
                        await _observe(store, outcome)
                done = Counter(o.kind for o in outcomes if o.actual != "running")
                progress(
                    f"  {time.perf_counter() - started:5.1f}s  orders {done['order']}/{orders}"
                    f"  trips {done['trip']}/{trips}"
                )
                if sum(done.values()) == len(outcomes):
                    break
        report.seconds = time.perf_counter() - started
        stop.set()
    return report
