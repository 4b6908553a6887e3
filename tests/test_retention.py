"""Retention of finished processes: removal once it passes, never of an active process,
a tombstone that a late trigger cannot restart, bounded batches; on fakeredis and on a
real Redis."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rsaga import EventStore, Keyspace
from rsaga.cli import main
from rsaga.config import ProcessSettings, SchedulerSettings
from rsaga.errors import StreamRemoved, ValidationError
from rsaga.events import EventRegistry, RecordedEvent
from rsaga.inspect import read_events, show_process
from rsaga.metrics import PrometheusObserver
from rsaga.process.engine import snapshot_fold
from rsaga.process.retention import Retention
from rsaga.processes import (
    Decision,
    EventTrigger,
    ProcessInfo,
    ProcessManager,
    Timeout,
    Trigger,
    decode_timeout,
)
from rsaga.runtime.scheduler import Scheduler
from rsaga.scripts import Scripts
from rsaga.store import ExpectedVersion, StreamWrite
from rsaga.testing import Driver


class Placed(msgspec.Struct, frozen=True):
    order_id: str


class Paid(msgspec.Struct, frozen=True):
    order_id: str


class Order(ProcessManager[None]):
    """Starts on `Placed` with a pending payment timeout; `Paid` completes it."""

    name = "order"
    events = (Placed, Paid)
    retention = 0.0

    def correlate(self, event: RecordedEvent) -> str | None:
        if not event.stream_id.startswith(f"cart.{self.name}-"):
            return None  # another type's order
        return str(event.data.order_id)

    def initial_state(self) -> None:
        return None

    def decide(self, state: None, trigger: Trigger, process: ProcessInfo) -> Decision:
        if isinstance(trigger, EventTrigger) and isinstance(trigger.event.data, Placed):
            return Decision(schedule=[Timeout("pay", 600)])
        if isinstance(trigger, EventTrigger) and isinstance(trigger.event.data, Paid):
            return Decision(complete=True)
        return Decision()


class KeptOrder(Order):
    name = "kept-order"
    retention = None


class HourOrder(Order):
    name = "hour-order"
    retention = 3600.0


class _Later:
    """A clock `seconds` ahead of this host's."""

    def __init__(self, seconds: float) -> None:
        self.offset_ms = round(seconds * 1000)

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


def _driver(redis: Redis, prefix: str, shards: int = 1) -> Driver:
    store = EventStore(redis, EventRegistry([Placed, Paid]), keyspace=Keyspace(prefix, shards))
    return Driver(store, [Order(), KeptOrder(), HourOrder()])


def _cart(order_id: str, process_type: str = "order") -> str:
    """The stream of an order's own events (the process's is "<type>-<id>")."""
    return f"cart.{process_type}-{order_id}"


async def _order(
    driver: Driver, order_id: str, *, paid: bool = True, process_type: str = "order"
) -> None:
    await driver.store.append(_cart(order_id, process_type), [Placed(order_id)])
    if paid:
        await driver.store.append(_cart(order_id, process_type), [Paid(order_id)])


def _types(events: list[RecordedEvent]) -> list[str]:
    return [e.type for e in events]


async def test_a_finished_process_is_removed_once_its_retention_passes(
    redis: Redis, prefix: str
) -> None:
    driver = _driver(redis, prefix)
    ks = driver.store.keyspace
    for n in range(3):
        await _order(driver, str(n))
    await _order(driver, "k", process_type="kept-order")
    await _order(driver, "h", process_type="hour-order")
    await _order(driver, "open", paid=False)
    await driver.run_until_idle()
    for manager, process_id in (
        (Order, "0"), (Order, "1"), (Order, "2"), (KeptOrder, "k"), (HourOrder, "h"),
    ):
        events = (await driver.store.read(manager.stream_id(process_id))).events
        info, _ = driver.processes.fold(manager(), process_id, events)
        assert info.status == "completed"
    expiring = await redis.zrange(ks.expiring_processes(0, "order"), 0, -1)
    assert sorted(expiring) == [b"order-0", b"order-1", b"order-2"]
    assert await redis.zcard(ks.expiring_processes(0, "kept-order")) == 0  # kept for ever
    stats_before = await redis.hgetall(ks.process_stats(0, "order"))

    retention = Retention(redis, ks)
    assert await retention.sweep(0) == {"order": 3}  # order-k and order-h are not due by the server

    for n in range(3):
        stream = Order.stream_id(str(n))
        events = (await driver.store.read(stream)).events
        assert _types(events) == ["rsaga.ProcessRemoved"]
        info, _ = driver.processes.fold(Order(), str(n), events)
        assert info.status == "removed"
        assert info.finished
        tid = f"{stream}|pay".encode()
        assert await redis.zscore(ks.timeouts(0), tid) is None
        assert await redis.hget(ks.timeout_data(0), tid) is None
    # only the open order is left in the index; the counters stay
    assert await redis.hkeys(ks.process_records(0, "order")) == [b"order-open"]
    assert await redis.zrange(ks.processes_by_id(0, "order"), 0, -1) == [b"order-open"]
    correlations = await redis.zrange(ks.processes_by_correlation(0, "order"), 0, -1)
    assert [c.split(b"\0")[1] for c in correlations] == [b"order-open"]
    for key in (ks.expiring_processes(0, "order"), ks.retrying_processes(0, "order"),
                *(ks.finished_processes(0, "order", o)
                  for o in ("completed", "failed", "compensated"))):
        assert await redis.exists(key) == 0, key
    assert await redis.hgetall(ks.process_stats(0, "order")) == stats_before
    # the open order (waiting on its payment) is untouched
    assert await redis.zscore(ks.waiting_processes(0, "order"), "order-open") is not None
    assert len((await driver.store.read(Order.stream_id("open"))).events) > 1

    # an hour later by the clock, the hour-order goes too; the kept one never
    later = Retention(redis, ks, clock=_Later(3601))
    assert await later.sweep(0) == {"hour-order": 1}
    assert _types((await driver.store.read("hour-order-h")).events) == ["rsaga.ProcessRemoved"]
    assert len((await driver.store.read("kept-order-k")).events) > 1


async def test_an_active_process_is_never_removed(redis: Redis, prefix: str) -> None:
    driver = _driver(redis, prefix)
    ks = driver.store.keyspace
    await _order(driver, "1", paid=False)
    await driver.run_until_idle()
    before = (await driver.store.read("order-1")).version
    # even wrongly listed as expired, the script checks the process is finished
    await redis.zadd(ks.expiring_processes(0, "order"), {"order-1": 0})
    assert await Retention(redis, ks).sweep(0) == {}
    assert (await driver.store.read("order-1")).version == before
    assert await redis.zcard(ks.expiring_processes(0, "order")) == 0
    assert await redis.zscore(ks.processes_since(0, "order"), "order-1") is not None
    # and it finishes (and is removed) normally afterwards
    await driver.store.append(_cart("1"), [Paid("1")])
    await driver.run_until_idle()
    assert await Retention(redis, ks).sweep(0) == {"order": 1}


async def test_a_late_trigger_for_a_removed_process_is_ignored(
    redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    driver = _driver(redis, prefix)
    ks = driver.store.keyspace
    await _order(driver, "1")
    await driver.run_until_idle()
    started = await redis.hget(ks.process_stats(0, "order"), "started")
    assert await Retention(redis, ks).sweep(0) == {"order": 1}
    observer = PrometheusObserver()
    driver.executor.observer = observer
    # a late payment, a replayed start: neither starts the process again
    await driver.store.append(_cart("1"), [Paid("1"), Placed("1")])
    with caplog.at_level("INFO", logger="rsaga.process"):
        await driver.run_until_idle()
    assert _types((await driver.store.read(Order.stream_id("1"))).events) == [
        "rsaga.ProcessRemoved"
    ]
    assert await redis.hget(ks.process_stats(0, "order"), "started") == started
    assert await redis.zcard(ks.processes_since(0, "order")) == 0
    assert await redis.zcard(ks.waiting_processes(0, "order")) == 0
    assert "it finished and was removed" in caplog.text
    assert observer.late_triggers.labels("order")._value.get() == 2
    # an explicit start of the same id does nothing either
    await driver.processes.start("order", "1")
    assert (await driver.store.read(Order.stream_id("1"))).version == 1


async def test_retention_racing_late_triggers_never_restarts_a_process(
    redis: Redis, prefix: str
) -> None:
    driver = _driver(redis, prefix)
    ks = driver.store.keyspace
    ids = [str(n) for n in range(40)]
    for order_id in ids:
        await _order(driver, order_id)
    await driver.run_until_idle()
    retention = Retention(redis, ks, batch_size=7)

    async def late_triggers() -> None:
        for order_id in ids:
            await driver.store.append(_cart(order_id), [Paid(order_id)])
            await driver.worker.run_until_idle()

    async with anyio.create_task_group() as tg:
        tg.start_soon(late_triggers)
        while await retention.sweep(0):
            await anyio.lowlevel.checkpoint()
    await driver.run_until_idle()
    assert await retention.sweep(0) == {}
    for order_id in ids:
        events = (await driver.store.read(Order.stream_id(order_id))).events
        assert _types(events) == ["rsaga.ProcessRemoved"], order_id
    assert await redis.hget(ks.process_stats(0, "order"), "started") == b"40"
    assert await redis.zcard(ks.processes_since(0, "order")) == 0


async def test_each_call_removes_at_most_one_batch(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = _driver(redis, prefix)
    ks = driver.store.keyspace
    for n in range(25):
        await _order(driver, str(n))
    await driver.run_until_idle()
    sizes: list[int] = []
    real = Scripts.remove_expired

    async def counted(self: Scripts, shard: int, process_type: str, candidates: Any,
                      *rest: Any) -> Any:
        sizes.append(len(candidates))
        return await real(self, shard, process_type, candidates, *rest)

    monkeypatch.setattr(Scripts, "remove_expired", counted)
    retention = Retention(redis, ks, batch_size=10)
    first = await retention.remove_batch(0, "order")
    assert (first.removed, first.more) == (10, True)
    assert await redis.zcard(ks.expiring_processes(0, "order")) == 15
    assert await retention.sweep(0) == {"order": 15}
    assert sizes == [10, 10, 5]


async def test_the_scheduler_removes_expired_processes_on_its_interval(
    redis: Redis, prefix: str
) -> None:
    driver = _driver(redis, prefix, shards=2)
    for n in range(6):
        await _order(driver, str(n))
    await driver.run_until_idle()
    ks = driver.store.keyspace
    observer = PrometheusObserver()
    scheduler = Scheduler(
        redis, ks, retention_interval=0.05, retention_batch=2, max_sleep=0.2, observer=observer
    )
    stop = anyio.Event()

    async def left() -> int:
        return sum([await redis.zcard(ks.expiring_processes(s, "order")) for s in (0, 1)])

    assert await left() == 6
    async with anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run, stop)
        with anyio.fail_after(10):
            while await left():
                await anyio.sleep(0.02)
        stop.set()
    for n in range(6):
        assert (await driver.store.read(Order.stream_id(str(n)))).version == 1
    assert observer.removed.labels("order")._value.get() == 6


def test_retention_settings_are_validated() -> None:
    assert ProcessSettings().retention == 7 * 86400
    assert ProcessSettings(retention=None).retention is None
    with pytest.raises(ValueError, match="retention"):
        ProcessSettings(retention=-1)
    with pytest.raises(ValueError, match="retention_batch"):
        SchedulerSettings(retention_batch=0)
    with pytest.raises(ValueError, match="retention_interval"):
        SchedulerSettings(retention_interval=0)

    for bad in (-1, "forever", True, float("inf")):
        class Bad(Order):
            name = "bad"
            retention = bad  # type: ignore[assignment]

        with pytest.raises(ValidationError, match="retention"):
            Bad.validate()


async def test_a_type_without_its_own_retention_takes_the_setting(prefix: str) -> None:
    from rsaga.executor import Executor
    from rsaga.process.runner import ProcessRunner
    from rsaga.testing import fake_store

    class Default(Order):
        name = "default-order"
        retention = "setting"

    store = fake_store(prefix=prefix)
    runner = ProcessRunner(Executor(store), [Default(), KeptOrder()], retention=60)
    assert runner.retention_ms(Default()) == 60_000
    assert runner.retention_ms(KeptOrder()) is None
    assert ProcessRunner(Executor(store), [Default()], retention=None).retention_ms(
        Default()
    ) is None


async def test_a_tombstone_is_small_reads_as_one_event_and_takes_no_writes(
    redis: Redis, prefix: str
) -> None:
    driver = _driver(redis, prefix)
    store, ks = driver.store, driver.store.keyspace
    await _order(driver, "1")
    await driver.run_until_idle()
    full = await _memory(redis, ks.stream(Order.stream_id("1")))
    await Retention(redis, ks).sweep(0)
    key = ks.stream(Order.stream_id("1"))
    assert await redis.type(key) == b"string"
    if full is not None:  # real Redis: a stream's first node alone is ~4.7 KB
        tombstone = await _memory(redis, key)
        assert tombstone is not None
        assert tombstone < 300 < full
    assert await store.version(Order.stream_id("1")) == 1
    assert (await store.read(Order.stream_id("1"), from_version=2)).events == []
    rows = await read_events(store, Order.stream_id("1"))
    assert [r.type for r in rows] == ["rsaga.ProcessRemoved"]
    assert await read_events(store, Order.stream_id("1"), from_version=2) == []
    view = await show_process(store, Order.stream_id("1"))
    assert view is not None
    assert view.status == "removed"
    # a write to it is refused with nothing written, not even to the other stream
    with pytest.raises(StreamRemoved, match="removed after its retention"):
        await store.commit([
            StreamWrite(_cart("2"), ExpectedVersion.ANY, [Placed("2")]),
            StreamWrite(Order.stream_id("1"), 1, [Paid("1")]),
        ])
    assert await store.version(_cart("2")) == 0
    assert await redis.get(key) is not None


async def _memory(redis: Redis, key: str) -> int | None:
    """MEMORY USAGE of `key`; None where the server has no such command (fakeredis)."""
    try:
        return int(await redis.memory_usage(key, samples=0))  # type: ignore[arg-type]
    except ResponseError:
        return None


def test_cli_archive_writes_the_processes_due_as_json_lines_and_removes_nothing(
    env: Path, real_redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)

    async def finish_orders() -> None:
        redis = Redis.from_url(real_redis_url)
        driver = _driver(redis, prefix)
        for n in range(2):
            await _order(driver, str(n))
        await _order(driver, "h", process_type="hour-order")
        await driver.run_until_idle()
        await redis.aclose()

    async def versions() -> list[int]:
        redis = Redis.from_url(real_redis_url)
        store = EventStore(redis, EventRegistry(), keyspace=Keyspace(prefix))
        found = [await store.version(s) for s in ("order-0", "order-1", "hour-order-h")]
        await redis.aclose()
        return found

    anyio.run(finish_orders)
    assert main(["archive"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(line["stream_id"] for line in lines) == ["order-0", "order-1"]
    assert {line["process_type"] for line in lines} == {"order"}
    assert [e["type"] for e in lines[0]["events"]][-1] == "rsaga.ProcessCompleted"
    assert main(["archive", "--within", "7200", "--output", "out.jsonl"]) == 0
    assert "archived 3 process(es) to out.jsonl" in capsys.readouterr().out
    assert len((env / "out.jsonl").read_text().splitlines()) == 3
    assert all(v > 1 for v in anyio.run(versions))


async def test_garbage_in_the_retention_sets_is_dropped_not_a_crash(
    redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Members of `expiring` that are no stream id (bad bytes, empty) and process types
    that are no text would stop every sweep: they are dropped with a warning, and the
    real processes around them are removed."""
    driver = _driver(redis, prefix)
    ks = driver.store.keyspace
    await _order(driver, "1")
    await driver.run_until_idle()
    expiring = ks.expiring_processes(0, "order")
    await redis.zadd(expiring, {b"bad id \xff\x00": 0, b"": 0})
    await redis.sadd(ks.process_types(0), b"\xff\xfe")
    retention = Retention(redis, ks)
    assert [e.stream_id for e in await retention.expiring()] == ["order-1"]
    with caplog.at_level("WARNING", logger="rsaga.retention"):
        assert await retention.sweep(0) == {"order": 1}
    assert "dropped 2 entries" in caplog.text
    assert await redis.zcard(expiring) == 0


def test_cli_archive_refuses_a_bad_window_or_output_in_one_line(
    env: Path, real_redis_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    for within in ("-5", "inf", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            main(["archive", "--within", within])
        assert exit_info.value.code == 2
        assert "--within: must be a number of seconds >= 0" in capsys.readouterr().err
    # Not "cannot reach Redis": a path that cannot be written is the user's to fix.
    assert main(["archive", "--output", str(env / "missing" / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == f"rsaga: --output {env / 'missing' / 'out.jsonl'}: No such file or directory\n"


class SnapshottedOrder(Order):
    name = "snapped-order"
    snapshot_every = 1


async def test_removing_a_process_removes_its_snapshot(redis: Redis, prefix: str) -> None:
    store = EventStore(redis, EventRegistry([Placed, Paid]), keyspace=Keyspace(prefix, 1))
    driver = Driver(store, [SnapshottedOrder()])
    await _order(driver, "s", process_type="snapped-order")
    await driver.run_until_idle()
    ks = store.keyspace
    stream = SnapshottedOrder.stream_id("s")
    snapshot = ks.snapshot(stream, snapshot_fold("snapped-order"))
    assert await redis.exists(snapshot) == 1  # written by the steps' commits
    assert await Retention(redis, ks).sweep(0) == {"snapped-order": 1}
    assert await redis.exists(snapshot) == 0
    assert _types((await store.read(stream)).events) == ["rsaga.ProcessRemoved"]


async def test_a_late_timeout_for_a_removed_process_is_ignored(
    redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A timeout already on its way (moved to the due stream, or redelivered) when its
    process finished and was removed fires into the tombstone: nothing is written."""
    driver = _driver(redis, prefix)
    ks = driver.store.keyspace
    await _order(driver, "1", paid=False)
    await driver.run_until_idle()
    stream = Order.stream_id("1")
    blob = await redis.hget(ks.timeout_data(0), f"{stream}|pay")
    assert blob is not None
    pending = decode_timeout(blob)
    await driver.store.append(_cart("1"), [Paid("1")])
    await driver.run_until_idle()
    assert await Retention(redis, ks).sweep(0) == {"order": 1}
    observer = PrometheusObserver()
    driver.executor.observer = observer
    with caplog.at_level("INFO", logger="rsaga.process"):
        assert await driver.processes.on_timeout(pending) == []
    assert _types((await driver.store.read(stream)).events) == ["rsaga.ProcessRemoved"]
    assert await redis.zcard(ks.processes_since(0, "order")) == 0
    assert await redis.zcard(ks.waiting_processes(0, "order")) == 0
    assert await redis.zcard(ks.timeouts(0)) == 0
    assert "it finished and was removed" in caplog.text
    assert observer.late_triggers.labels("order")._value.get() == 1


async def test_a_worker_gives_processes_finished_before_retention_an_expiry(
    redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A process that finished before retention existed is in no `expiring` set; the next
    worker to start puts it there (end + retention), so the scheduler removes it too."""
    driver = _driver(redis, prefix)
    ks = driver.store.keyspace
    await _order(driver, "old")
    await _order(driver, "k", process_type="kept-order")
    await _order(driver, "h", process_type="hour-order")
    await driver.run_until_idle()
    ended = await redis.zscore(ks.finished_processes(0, "order", "completed"), "order-old")
    assert ended is not None
    await redis.zrem(ks.expiring_processes(0, "order"), "order-old")  # as before retention
    hour = await redis.zscore(ks.expiring_processes(0, "hour-order"), "hour-order-h")
    assert await Retention(redis, ks).sweep(0) == {}
    with caplog.at_level("INFO", logger="rsaga.worker"):
        await driver.run_until_idle()  # a worker starts
    assert await redis.zscore(ks.expiring_processes(0, "order"), "order-old") == ended
    assert "1 finished order process(es) of shard 0 had no expiry" in caplog.text
    assert await redis.zscore(ks.expiring_processes(0, "hour-order"), "hour-order-h") == hour
    assert await redis.zcard(ks.expiring_processes(0, "kept-order")) == 0  # kept for ever
    assert await Retention(redis, ks).sweep(0) == {"order": 1}
    assert _types((await driver.store.read(Order.stream_id("old"))).events) == [
        "rsaga.ProcessRemoved"
    ]


async def test_a_process_listed_again_after_its_removal_is_not_removed_twice(
    redis: Redis, prefix: str
) -> None:
    """A backfill that read the finished sets just before a removal lists the process in
    `expiring` again: the next sweep only takes it out, and counts nothing."""
    driver = _driver(redis, prefix)
    ks = driver.store.keyspace
    await _order(driver, "1")
    await driver.run_until_idle()
    retention = Retention(redis, ks)
    assert await retention.sweep(0) == {"order": 1}
    tombstone = await redis.get(ks.stream(Order.stream_id("1")))
    await redis.zadd(ks.expiring_processes(0, "order"), {"order-1": 0})
    assert await retention.sweep(0) == {}
    assert await redis.zcard(ks.expiring_processes(0, "order")) == 0
    assert await redis.get(ks.stream(Order.stream_id("1"))) == tombstone
