"""`rsaga demo`: order fulfilment processes and travel-booking sagas, end to end.

The demo places orders and requests trips, some set up to fail or to time out,
runs a worker and a scheduler (in this process, or elsewhere: `drive_only`),
shows progress, and ends with a summary. It succeeds only if every process
reached the terminal state its inputs call for:

- an order whose payment goes through completes; a declined one fails; one
  whose payment service never answers times out (retries, then fails);
- a trip whose services all book completes; one where a service refuses is
  compensated; one where a service never answers times out and is compensated.

In this process the timeouts are demo-sized (3 s) so the demo runs in seconds;
with `drive_only` the workers run the installed definitions, and the demo waits
as long as their timeouts and retries can take (`settle_time`).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from redis.asyncio import Redis

from rsaga.app import framework_registry
from rsaga.config import WorkerSettings
from rsaga.events import new_id
from rsaga.executor import Executor
from rsaga.health import live_heartbeats
from rsaga.keyspace import Keyspace
from rsaga.processes import (
    ProcessCompensated,
    ProcessCompleted,
    ProcessFailed,
    ProcessManager,
    ProcessStarted,
)
from rsaga.retry import ExponentialBackoff, FixedDelay, LinearBackoff, RetryPolicy
from rsaga.sagas import Saga, SagaCompensated, SagaCompleted, StepFailed
from rsaga.scheduler import Scheduler
from rsaga.store import EventStore
from rsaga.worker import Worker
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
"""What the worker in this process runs."""

HEARTBEAT_CHECK_EVERY = 2.0
"""Seconds between looks for live workers and schedulers when they run elsewhere."""


def _retries_total(policy: RetryPolicy) -> float:
    if isinstance(policy, FixedDelay | ExponentialBackoff | LinearBackoff):
        return sum(policy.base_delay(n) for n in range(1, policy.max_retries + 1))
    return sum(policy.delay(n) or 0.0 for n in range(1, policy.max_retries + 1))


def settle_time(definition: type[Any]) -> float:
    """Seconds the slowest process of `definition` takes when a service never answers:
    every wait and retry of an order, or every step timeout and compensation retry of
    a saga (jitter only shortens the delays)."""
    if issubclass(definition, Saga):
        steps: float = sum(step.timeout for step in definition.steps)
        return steps + _retries_total(definition.compensation_retry)
    wait: float = getattr(definition, "wait_timeout", 0.0)
    retry: RetryPolicy = definition.retry
    return wait * (retry.max_retries + 1) + _retries_total(retry)


def demo_deadline(orders: type[Any], trips: type[Any]) -> float:
    """How long the demo waits for every process to end: the slower definition's
    settle time, with room for a loaded machine."""
    return 1.5 * max(settle_time(orders), settle_time(trips)) + 30.0


def demo_store(
    redis: Redis, prefix: str, definitions: Sequence[type[Any]] = DEMO_HANDLERS
) -> EventStore:
    """A store whose registry knows every event of the demo and of `definitions`
    (what they handle and read, and a process's own events)."""
    registry = framework_registry([*WORLD_EVENTS, *TRAVEL_EVENTS])
    for definition in definitions:
        if issubclass(definition, ProcessManager):
            registry.register(*definition.state_events)
        registry.register(*definition.events, *definition.decodes)
    return EventStore(redis, registry, keyspace=Keyspace(prefix=prefix))


async def clean(redis: Redis, prefix: str) -> int:
    """Delete every key under `prefix` (the demo's own keyspace); the number deleted."""
    removed = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += await redis.unlink(*batch)
            batch.clear()
    if batch:
        removed += await redis.unlink(*batch)
    return removed


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
    name = OrderFulfilment.name if outcome.kind == "order" else TravelBooking.name
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


def missing_runners(beats: Sequence[Any], handlers: Sequence[str]) -> list[str]:
    """What the demo needs that no live heartbeat in `beats` provides: a worker running
    each of `handlers`, and a scheduler."""
    running = {name for beat in beats if beat.kind == "worker" for name in beat.handlers}
    missing = [f"worker running {name}" for name in handlers if name not in running]
    if not any(beat.kind == "scheduler" for beat in beats):
        missing.append("scheduler")
    return missing


async def _watch_runners(
    store: EventStore, handlers: Sequence[str], notice: Callable[[str], None]
) -> None:
    """Say when the workers and scheduler the demo relies on are not alive, and when
    they come back."""
    said: list[str] = []
    while True:
        missing = missing_runners(await live_heartbeats(store.redis, store.keyspace), handlers)
        if missing and missing != said:
            notice(
                f"no live {', no '.join(missing)} under prefix {store.keyspace.prefix!r} "
                "(no heartbeat): nothing moves these processes until they start, e.g. "
                "`honcho start` with the same RSAGA_REDIS_URL and RSAGA_PREFIX"
            )
        elif said and not missing:
            notice("workers and a scheduler are alive now")
        said = missing
        await anyio.sleep(HEARTBEAT_CHECK_EVERY)


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
    definitions: Sequence[type[Any]] | None = None,
    deadline: float | None = None,
    progress: Callable[[str], None] = print,
    notice: Callable[[str], None] = print,
    tick: float = 0.25,
) -> DemoReport:
    """Run the demo on `redis`; with `drive_only`, workers and a scheduler run elsewhere.

    `definitions` are the handler and process classes the workers run (by default the
    demo-sized `DEMO_HANDLERS`, which with `drive_only` are only read); the deadline
    follows their timeouts unless given. `progress` gets a status line every `tick`
    seconds from the start; `notice` gets lines worth keeping, such as that no worker
    is alive (checked at once and every `HEARTBEAT_CHECK_EVERY` seconds).
    """
    definitions = tuple(definitions or DEMO_HANDLERS)
    by_name = {d.name: d for d in definitions}
    order_definition = by_name.get(OrderFulfilment.name, DemoOrders)
    trip_definition = by_name.get(TravelBooking.name, DemoTravel)
    if deadline is None:
        deadline = demo_deadline(order_definition, trip_definition)
    store = demo_store(redis, prefix, (*definitions, order_definition, trip_definition))
    placed, requested, outcomes = plan(orders, trips, failure_rate, timeout_rate, seed)
    report = DemoReport(outcomes)
    started = time.perf_counter()
    appended = 0

    def status() -> str:
        done = Counter(o.kind for o in outcomes if o.actual != "running")
        line = (
            f"{time.perf_counter() - started:5.1f}s  orders {done['order']}/{orders}"
            f"  trips {done['trip']}/{trips}"
        )
        return line if appended == len(outcomes) else f"{line}  (starting {appended})"

    async def show() -> None:
        while True:
            progress(status())
            await anyio.sleep(tick)

    stop = anyio.Event()
    async with anyio.create_task_group() as runners:
        if not drive_only:
            worker = Worker(
                Executor(store),
                [cls() for cls in definitions],
                settings=WorkerSettings(concurrency=64, block_ms=200, shutdown_timeout=2),
            )
            runners.start_soon(worker.run, stop)
            runners.start_soon(Scheduler(redis, store.keyspace, max_sleep=0.5).run, stop)
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(show)
            if drive_only:
                names = [order_definition.name, trip_definition.name]
                watchers.start_soon(_watch_runners, store, names, notice)
            for order in placed:
                await store.append(f"order-{order.order_id}", [order])
                appended += 1
            for trip in requested:
                await store.append(f"trip-{trip.trip_id}", [trip])
                appended += 1
            with anyio.move_on_after(deadline):
                while running := [o for o in outcomes if o.actual == "running"]:
                    for outcome in running:
                        await _observe(store, outcome)
                    await anyio.sleep(tick)
            report.seconds = time.perf_counter() - started
            progress(status())
            watchers.cancel_scope.cancel()
        stop.set()
    return report
