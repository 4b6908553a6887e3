"""Process managers, timeouts and the scheduler, driven in-process on both backends."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from conftest import shards_for
from redis.asyncio import Redis
from rsaga_examples.orders import (
    WORLD_EVENTS,
    Delivered,
    InventoryReserved,
    InventoryService,
    OrderFulfilment,
    OrderPlaced,
    PaymentConfirmed,
    PaymentDeclined,
    PaymentRequested,
    PaymentService,
    Shipped,
    ShippingService,
    StatusChanged,
)

from rsaga import EventRegistry, EventStore, Keyspace, RecordedEvent
from rsaga.deadletters import DeadLetters
from rsaga.processes import (
    Decision,
    ProcessCompleted,
    ProcessFailed,
    ProcessInfo,
    ProcessManager,
    RetryScheduled,
    StartTrigger,
    Timeout,
    TimeoutFired,
    TimeoutPayload,
    TimeoutScheduled,
    Trigger,
    decode_timeout,
)
from rsaga.retry import ExponentialBackoff, FixedDelay, LinearBackoff, RetryPolicy
from rsaga.testing import Driver, ManualClock


def make_store(redis: Redis, prefix: str, shards: int | None = None) -> EventStore:
    """A store on `redis`; on a cluster with 8 shards unless `shards` is given (tests that
    look at one shard's keys use one shard)."""
    keyspace = Keyspace(prefix=prefix, shards=shards or shards_for(redis))
    return EventStore(redis, EventRegistry(WORLD_EVENTS), keyspace=keyspace)


async def history(store: EventStore, stream_id: str) -> list[RecordedEvent]:
    return (await store.read(stream_id)).events


def types(events: list[RecordedEvent]) -> list[str]:
    return [e.type for e in events]


async def timeouts_of(redis: Redis, store: EventStore, stream_id: str) -> list[bytes]:
    members = await redis.zrange(store.keyspace.timeouts(0), 0, -1)
    return [m for m in members if m.startswith(stream_id.encode() + b"|")]


async def test_order_fulfilment_happy_path_completes_and_leaves_no_timeouts(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    services = [PaymentService(), InventoryService(), ShippingService()]
    driver = Driver(store, [OrderFulfilment(), *services])
    await store.append("order-1", [OrderPlaced("1", 250)])
    await driver.run_until_idle()

    events = await history(store, "order-fulfilment-1")
    statuses = [e.data.status for e in events if isinstance(e.data, StatusChanged)]
    assert statuses == [
        "PaymentPending", "PaymentConfirmed", "InventoryReserved", "Shipped", "Delivered",
        "Completed",
    ]
    assert isinstance(events[-1].data, ProcessCompleted)
    assert await timeouts_of(redis, store, "order-fulfilment-1") == []
    assert await redis.hlen(store.keyspace.timeout_data(0)) == 0
    stats = await redis.hgetall(store.keyspace.process_stats(0, "order-fulfilment"))
    assert (stats[b"started"], stats[b"completed"]) == (b"1", b"1")
    assert await redis.zcard(store.keyspace.active_processes(0, "order-fulfilment")) == 0
    payments = await history(store, "payment-1")
    assert types(payments) == ["orders.PaymentRequested", "orders.PaymentConfirmed"]
    assert payments[0].correlation_id == events[0].correlation_id


POLICIES: list[RetryPolicy] = [
    FixedDelay(interval=7.0, max_retries=3),
    ExponentialBackoff(base=2.0, cap=5.0, max_retries=4),
    LinearBackoff(initial=1.0, increment=2.5, max_retries=3),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
async def test_no_payment_retries_with_the_policy_delays_then_fails(
    redis: Redis, prefix: str, policy: RetryPolicy
) -> None:
    class Impatient(OrderFulfilment):
        retry = policy

    store = make_store(redis, prefix, shards=1)
    driver = Driver(store, [Impatient()])
    await store.append("order-7", [OrderPlaced("7", 10)])
    await driver.run_until_idle()
    for attempt in range(1, policy.max_retries + 2):
        await driver.advance(Impatient.wait_timeout)  # the payment wait times out
        delay = policy.delay(attempt)
        if delay is not None:
            await driver.advance(delay)  # the retry fires and asks again

    events = await history(store, "order-fulfilment-7")
    retries = [e for e in events if isinstance(e.data, RetryScheduled)]
    assert [e.data.attempt for e in retries] == list(range(1, policy.max_retries + 1))
    for event in retries:
        scheduled_at = int(event.occurred_at.timestamp() * 1000)
        expected = policy.base_delay(event.data.attempt)
        assert event.data.retry_at_ms - scheduled_at == round(expected * 1000)
    assert isinstance(events[-1].data, ProcessFailed)
    assert events[-1].data.reason == f"payment: gave up after {policy.max_retries} retries"
    requests = await history(store, "payment-7")
    assert len(requests) == policy.max_retries + 1
    assert await timeouts_of(redis, store, "order-fulfilment-7") == []
    stats = await redis.hgetall(store.keyspace.process_stats(0, "order-fulfilment"))
    assert stats[b"failed"] == b"1"


def comparable(events: list[RecordedEvent]) -> list[Any]:
    """A history without ids and times (tokens differ between two runs by design)."""
    out = []
    for event in events:
        data = event.data
        if isinstance(data, TimeoutScheduled | TimeoutFired):
            data = (type(data).__name__, data.name, data.attempt)
        out.append((event.type, data if not hasattr(data, "token") else type(data).__name__))
    return out


async def run_scenario(redis: Redis, prefix: str, *, twice: bool) -> list[RecordedEvent]:
    """Order with a payment timeout and retry, then replies; every trigger twice if asked."""
    store = make_store(redis, prefix)
    driver = Driver(store, [OrderFulfilment()], clock=ManualClock())
    runner = driver.processes
    manager = runner.managers["order-fulfilment"]

    async def deliver(stream_id: str, event: msgspec.Struct) -> None:
        [recorded] = (await store.append(stream_id, [event])).events
        for _ in range(2 if twice else 1):
            await runner.on_event(manager, recorded)

    shard = store.keyspace.shard_of("order-fulfilment-3")

    async def fire_due() -> None:
        ks = store.keyspace
        due = await redis.zrangebyscore(ks.timeouts(shard), "-inf", driver.clock.now_ms())
        for member in due:
            payload = decode_timeout(await redis.hget(ks.timeout_data(shard), member))
            await redis.zrem(ks.timeouts(shard), member)
            for _ in range(2 if twice else 1):
                await runner.on_timeout(payload)

    await deliver("order-3", OrderPlaced("3", 99))
    driver.clock.advance(OrderFulfilment.wait_timeout)
    await fire_due()  # payment wait -> retry scheduled
    driver.clock.advance(3600)
    await fire_due()  # retry -> payment asked again
    await deliver("payment-3", PaymentConfirmed("3"))
    await deliver("inventory-3", InventoryReserved("3"))
    await deliver("shipment-3", Shipped("3"))
    await deliver("shipment-3", Delivered("3"))
    await fire_due()  # nothing left to fire
    assert await timeouts_of(redis, store, "order-fulfilment-3") == []
    return await history(store, "order-fulfilment-3")


async def test_every_trigger_twice_gives_the_same_history_as_once(
    redis: Redis, prefix: str
) -> None:
    once = await run_scenario(redis, prefix + "a", twice=False)
    twice = await run_scenario(redis, prefix + "b", twice=True)
    assert comparable(twice) == comparable(once)
    assert isinstance(once[-1].data, ProcessCompleted)
    assert "rsaga.RetryScheduled" in types(once)
    store = make_store(redis, prefix + "b")
    requests = [e for e in await history(store, "payment-3") if e.type.endswith("Requested")]
    assert len(requests) == 2  # the first request and the retry, each once


async def test_duplicated_log_entries_reach_the_process_once(redis: Redis, prefix: str) -> None:
    """Every trigger is on the log twice (as after a crash before acknowledging)."""
    store = make_store(redis, prefix, shards=1)
    driver = Driver(store, [OrderFulfilment()])
    log_key = store.keyspace.log(0)
    for stream_id, event in [
        ("order-5", OrderPlaced("5", 1)),
        ("payment-5", PaymentConfirmed("5")),
        ("inventory-5", InventoryReserved("5")),
        ("shipment-5", Shipped("5")),
        ("shipment-5", Delivered("5")),
    ]:
        # Replies come after the request they answer (a process sees triggers of
        # different streams in any order, so the test keeps them causal).
        await store.append(stream_id, [event])
        [(_, fields)] = await redis.xrevrange(log_key, count=1)
        await redis.xadd(log_key, fields)
        await driver.run_until_idle()
    events = await history(store, "order-fulfilment-5")
    assert isinstance(events[-1].data, ProcessCompleted)
    statuses = [e.data.status for e in events if isinstance(e.data, StatusChanged)]
    assert statuses == [
        "PaymentPending", "PaymentConfirmed", "InventoryReserved", "Shipped", "Delivered",
        "Completed",
    ]
    for service in ("payment-5", "inventory-5"):
        requested = [e for e in await history(store, service) if e.type.endswith("Requested")]
        assert len(requested) == 1


async def test_a_timeout_whose_process_moved_on_is_discarded(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    driver = Driver(store, [OrderFulfilment()])
    await store.append("order-9", [OrderPlaced("9", 5)])
    await driver.run_until_idle()
    pending = await timeouts_of(redis, store, "order-fulfilment-9")
    [member] = [m for m in pending if m.endswith(b"|payment-wait")]
    stale = decode_timeout(await redis.hget(store.keyspace.timeout_data(0), member))
    await store.append("payment-9", [PaymentConfirmed("9")])
    await driver.run_until_idle()
    before = await history(store, "order-fulfilment-9")
    await driver.processes.on_timeout(stale)  # fires late, after the payment came
    assert await history(store, "order-fulfilment-9") == before
    assert not any(isinstance(e.data, TimeoutFired) for e in before)


async def test_payment_declined_fails_the_order(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    driver = Driver(store, [OrderFulfilment()])
    await store.append("order-4", [OrderPlaced("4", 5)])
    await store.append("payment-4", [PaymentDeclined("4", "card expired")])
    await driver.run_until_idle()
    events = await history(store, "order-fulfilment-4")
    assert events[-1].data.reason == "payment declined: card expired"
    assert await timeouts_of(redis, store, "order-fulfilment-4") == []


class Alarm(ProcessManager[int]):
    """Started explicitly; rings after `data` seconds (negative: in the past)."""

    name = "alarm"
    deadline = 100.0

    def initial_state(self) -> int:
        return 0

    def decide(self, state: int, trigger: Trigger, process: ProcessInfo) -> Decision:
        if isinstance(trigger, StartTrigger):
            return Decision(schedule=[Timeout("ring", trigger.data)])
        return Decision(complete=True)


async def test_a_timeout_in_the_past_fires_promptly(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    driver = Driver(store, [Alarm()])
    await driver.processes.start("alarm", "a1", -30.0)
    await driver.run_until_idle()  # no clock movement needed
    events = await history(store, "alarm-a1")
    assert isinstance(events[-1].data, ProcessCompleted)
    fired = [e.data for e in events if isinstance(e.data, TimeoutFired)]
    assert [f.name for f in fired] == ["ring"]


async def test_explicit_start_is_idempotent(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    driver = Driver(store, [Alarm()])
    await driver.processes.start("alarm", "a2", 10.0)
    await driver.processes.start("alarm", "a2", 10.0)
    events = await history(store, "alarm-a2")
    assert types(events) == ["rsaga.ProcessStarted", "rsaga.TimeoutScheduled",
                             "rsaga.TimeoutScheduled"]  # ring and the deadline


async def test_the_deadline_fails_a_process_with_a_clear_reason(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    driver = Driver(store, [Alarm()])
    await driver.processes.start("alarm", "a3", 1000.0)  # rings after the deadline
    await driver.advance(100)
    events = await history(store, "alarm-a3")
    assert events[-1].data.reason == "deadline of 100s passed"
    assert events[-1].data.duration_ms == 100_000
    assert await timeouts_of(redis, store, "alarm-a3") == []  # the ring was cancelled


async def test_a_timeout_for_a_process_type_not_run_here_waits_for_its_workers(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix)
    driver = Driver(store, [Alarm()])
    payload = TimeoutPayload("vanished", "x1", "ring", "tok", 1, 0)
    member = "vanished-x1|ring"
    await redis.zadd(store.keyspace.timeouts(0), {member: 0})
    await redis.hset(store.keyspace.timeout_data(0), member, msgspec.msgpack.encode(payload))
    await driver.run_until_idle()
    assert await DeadLetters(redis, store.keyspace).count() == 0
    [(_, fields)] = await redis.xrange(store.keyspace.due_timeouts(0))
    assert (fields[b"s"], fields[b"t"]) == (b"vanished-x1", b"vanished")


async def test_requests_are_recorded_once_per_attempt(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    driver = Driver(store, [OrderFulfilment()])
    await store.append("order-8", [OrderPlaced("8", 3)])
    await driver.run_until_idle()
    await driver.run_until_idle()
    assert [type(e.data) for e in await history(store, "payment-8")] == [PaymentRequested]


@pytest.mark.slow
async def test_100000_timeouts_due_at_the_same_moment_all_drain(
    real_redis_url: str, prefix: str
) -> None:
    from rsaga.scheduler import Scheduler

    redis = Redis.from_url(real_redis_url)
    ks = Keyspace(prefix=prefix)
    due_ms = 1_700_000_000_000
    encoder = msgspec.msgpack.Encoder()
    for start in range(0, 100_000, 10_000):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, start + 10_000):
                member = f"alarm-{n}|ring"
                payload = TimeoutPayload("alarm", str(n), "ring", f"t{n}", 1, due_ms)
                pipe.zadd(ks.timeouts(0), {member: due_ms})
                pipe.hset(ks.timeout_data(0), member, encoder.encode(payload))
            await pipe.execute()
    scheduler = Scheduler(redis, ks, clock=ManualClock(due_ms), batch_size=1000)
    assert await scheduler.drain(0) == 100_000
    assert await redis.zcard(ks.timeouts(0)) == 0
    assert await redis.hlen(ks.timeout_data(0)) == 0
    assert await redis.xlen(ks.due_timeouts(0)) == 100_000
    seen: set[bytes] = set()
    last = "-"
    while True:
        page = await redis.xrange(ks.due_timeouts(0), last, "+", count=10_000)
        page = [e for e in page if e[0].decode() != last]
        if not page:
            break
        seen.update(fields[b"s"] for _, fields in page)
        last = page[-1][0].decode()
    assert len(seen) == 100_000  # each exactly once
    assert (await scheduler.tick(0)).next_due_ms is None
    await redis.aclose()


async def test_the_scheduler_reports_the_next_due_time(redis: Redis, prefix: str) -> None:
    from rsaga.scheduler import Scheduler

    store = make_store(redis, prefix, shards=1)
    clock = ManualClock()
    driver = Driver(store, [Alarm()], clock=clock)
    await driver.processes.start("alarm", "n1", 42.0)
    tick = await Scheduler(redis, store.keyspace, clock=clock).tick(0)
    assert tick.moved == 0
    assert tick.next_due_ms == clock.now_ms() + 42_000


async def test_the_scheduler_is_woken_by_an_earlier_timeout(redis: Redis, prefix: str) -> None:
    import time

    import anyio

    from rsaga.executor import Executor
    from rsaga.processes import ProcessRunner
    from rsaga.scheduler import Scheduler

    store = make_store(redis, prefix, shards=1)
    runner = ProcessRunner(Executor(store), [Alarm()])
    await runner.start("alarm", "late", 60.0)
    scheduler = Scheduler(redis, store.keyspace, max_sleep=5.0)
    stop = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run, stop)
            await anyio.sleep(0.2)  # the scheduler now sleeps towards the 60 s timeout
            started = time.monotonic()
            await runner.start("alarm", "soon", 0.1)
            while not await redis.xlen(store.keyspace.due_timeouts(0)):
                await anyio.sleep(0.005)
            waited = time.monotonic() - started
            stop.set()
            stopping = time.monotonic()
    assert waited < 1.0, f"the scheduler slept {waited:.2f}s past an earlier timeout"
    assert time.monotonic() - stopping < 1.0, "the scheduler did not stop promptly"
    [(_, fields)] = await redis.xrange(store.keyspace.due_timeouts(0))
    assert fields[b"s"] == b"alarm-soon"
