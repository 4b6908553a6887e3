"""The worker in-process, on fakeredis and on a real Redis."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import msgspec
import pytest
from conftest import shards_for
from redis.asyncio import Redis
from worker_plugins import Flaky, Other, Ping, Recorder, Seen

from rsaga import (
    EventRegistry,
    EventStore,
    Executor,
    Keyspace,
    RecordedEvent,
    StatelessCommand,
    StreamId,
    ValidationError,
)
from rsaga.config import WorkerSettings
from rsaga.consumer import START_FROM_BEGINNING, GroupConsumer
from rsaga.deadletters import DeadLetter, DeadLetters
from rsaga.events import MAX_EVENT_NESTING
from rsaga.handlers import EventHandler, HandlerContext
from rsaga.retry import FixedDelay
from rsaga.scripts import script
from rsaga.worker import Worker

FAST = WorkerSettings(concurrency=32, block_ms=50, heartbeat_ttl=5, shutdown_timeout=5)


def make_store(redis: Redis, prefix: str, shards: int | None = None) -> EventStore:
    """A store on `redis`; on a cluster with 8 shards unless `shards` is given (tests that
    look at one shard's keys use one shard)."""
    keyspace = Keyspace(prefix=prefix, shards=shards or shards_for(redis))
    return EventStore(redis, EventRegistry([Ping, Other, Seen]), keyspace=keyspace)


async def run_workers(
    workers: Sequence[Worker],
    until: Callable[[], Awaitable[bool]],
    timeout: float = 20.0,
) -> None:
    """Run `workers` until `until()` holds (checked every 20 ms), then stop them."""
    stop = anyio.Event()
    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(worker.run, stop)
            while not await until():
                await anyio.sleep(0.02)
            stop.set()


async def settled(redis: Redis, store: EventStore) -> bool:
    """Every group has read the whole log and acknowledged everything.

    (Seen events land on the log too; the worker acknowledges them unhandled.)
    """
    log_key = store.keyspace.log(0)
    last = (await redis.xrevrange(log_key, count=1))[0][0]
    groups = await redis.xinfo_groups(log_key)
    return bool(groups) and all(
        g["pending"] == 0 and g["last-delivered-id"] == last for g in groups
    )


async def seen_versions(store: EventStore, stream_id: str) -> list[int]:
    return [e.data.version for e in (await store.read(f"seen-{stream_id}")).events]


async def append_interleaved(store: EventStore, streams: int, per_stream: int) -> list[str]:
    ids = [f"s-{n}" for n in range(streams)]
    order = [s for s in ids for _ in range(per_stream)]
    random.Random(7).shuffle(order)
    for stream_id in order:
        await store.append(stream_id, [Ping()])
    return ids


class JitteryRecorder(Recorder):
    async def handle(self, event, ctx):  # type: ignore[no-untyped-def]
        await anyio.sleep(random.random() * 0.003)
        await super().handle(event, ctx)


async def test_every_event_handled_once_in_stream_order(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    ids = await append_interleaved(store, streams=20, per_stream=15)
    worker = Worker(Executor(store), [JitteryRecorder()], settings=FAST)

    async def done() -> bool:
        if not all([len(await seen_versions(store, s)) == 15 for s in ids]):
            return False
        return await settled(redis, store)

    await run_workers([worker], done)
    for stream_id in ids:
        assert await seen_versions(store, stream_id) == list(range(1, 16))


class CountingRecorder(Recorder):
    """A `Recorder` that notes how many of its calls run at once."""

    running = 0
    most = 0

    async def handle(self, event, ctx):  # type: ignore[no-untyped-def]
        cls = type(self)
        cls.running += 1
        cls.most = max(cls.most, cls.running)
        try:
            await anyio.sleep(random.random() * 0.002)
            await super().handle(event, ctx)
        finally:
            cls.running -= 1


async def test_many_streams_share_a_few_drainers_in_stream_order(
    redis: Redis, prefix: str
) -> None:
    """200 streams, concurrency 4: at most 4 entries run at once, 4 of them do, and every
    stream is drained to its end in order (a drainer takes stream after stream)."""
    CountingRecorder.running = CountingRecorder.most = 0
    store = make_store(redis, prefix)
    ids = await append_interleaved(store, streams=200, per_stream=3)
    settings = WorkerSettings(concurrency=4, block_ms=50, heartbeat_ttl=5, shutdown_timeout=5)
    worker = Worker(Executor(store), [CountingRecorder()], settings=settings)

    async def done() -> bool:
        if not all([len(await seen_versions(store, s)) == 3 for s in ids]):
            return False
        return await settled(redis, store)

    await run_workers([worker], done, timeout=60)
    for stream_id in ids:
        assert await seen_versions(store, stream_id) == [1, 2, 3]
    assert CountingRecorder.most == 4


async def test_two_workers_share_a_group_and_keep_stream_order(redis: Redis, prefix: str) -> None:
    """Entries of a stream owned by one consumer are handed to it by the other."""
    store = make_store(redis, prefix)
    ids = [f"s-{n}" for n in range(6)]
    workers = [
        Worker(Executor(store), [JitteryRecorder()], settings=FAST, name=f"w{n}")
        for n in range(2)
    ]
    total = 6 * 25

    async def produce_then_check() -> bool:
        return sum([len(await seen_versions(store, s)) for s in ids]) == total

    stop = anyio.Event()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(worker.run, stop)
            rng = random.Random(3)
            for _ in range(total // len(ids)):
                for stream_id in rng.sample(ids, len(ids)):
                    await store.append(stream_id, [Ping()])
                await anyio.sleep(0.001)
            while not await produce_then_check():
                await anyio.sleep(0.02)
            stop.set()
    for stream_id in ids:
        assert await seen_versions(store, stream_id) == list(range(1, 26))
    log_key = store.keyspace.log(0)
    consumers = await redis.xinfo_consumers(log_key, Recorder.name)
    assert {c["name"] for c in consumers} >= {b"w0", b"w1"} or len(consumers) == 2
    assert await redis.hlen(store.keyspace.stream_owners(0, Recorder.name)) == 0
    assert await redis.hlen(store.keyspace.in_flight(0, Recorder.name)) == 0


class Picky(EventHandler):
    name = "picky"
    events = (Ping,)
    seen: list[str] = []

    async def handle(self, event, ctx: HandlerContext) -> None:  # type: ignore[no-untyped-def]
        type(self).seen.append(event.type)


async def test_unwanted_types_are_acknowledged_without_reaching_the_handler(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    Picky.seen = []
    await store.append("a", [Other(), Other(), Ping(), Other()])
    worker = Worker(Executor(store), [Picky()], settings=FAST)

    async def done() -> bool:
        info = await redis.xinfo_groups(store.keyspace.log(0))
        return bool(info) and info[0]["pending"] == 0 and info[0]["last-delivered-id"] != b"0-0"

    await run_workers([worker], done)
    assert Picky.seen == ["Ping"]


async def test_a_group_that_wants_no_type_gets_no_entry(redis: Redis, prefix: str) -> None:
    """An empty `wanted` (a process type with no trigger events) is not "every entry":
    the entries are acknowledged inside Redis and never reach Python."""
    store = make_store(redis, prefix, shards=1)
    await store.append("a", [Other(), Ping()])
    consumer = GroupConsumer(
        redis, store.keyspace, 0, "nothing", "c1", claim_timeout_ms=30_000,
        stream=store.keyspace.log(0),
    )
    await consumer.ensure_group(START_FROM_BEGINNING)
    assert (await consumer.read(100, set())).entries == []
    info = await redis.xinfo_groups(store.keyspace.log(0))
    assert info[0]["pending"] == 0
    assert info[0]["last-delivered-id"] == (await redis.xrevrange(store.keyspace.log(0)))[0][0]
    everything = GroupConsumer(
        redis, store.keyspace, 0, "everything", "c1", claim_timeout_ms=30_000,
        stream=store.keyspace.log(0),
    )
    await everything.ensure_group(START_FROM_BEGINNING)
    assert len((await everything.read(100, None)).entries) == 2


async def test_failing_handler_dead_letters_then_replay_succeeds(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    Flaky.calls = []
    await store.append("acct", [Ping(n=1)])
    dead = DeadLetters(redis, store.keyspace)
    await run_workers(
        [Worker(Executor(store), [Flaky()], settings=FAST)], lambda: _has(dead.count(), 1)
    )
    assert Flaky.calls == [1, 1, 1]  # first attempt + max_retries=2
    [letter] = await dead.list()
    assert letter.handler == "flaky"
    assert letter.error_type == "ValueError"
    assert "cannot handle acct@1 yet" in letter.error
    assert "raise ValueError" in letter.traceback
    assert letter.attempts == 3
    assert (letter.stream_id, letter.version) == ("acct", 1)
    groups = await redis.xinfo_groups(store.keyspace.log(0))
    assert groups[0]["pending"] == 0

    await redis.set(f"{prefix}:fixed", 1)
    assert await dead.replay(letter.id) is not None
    assert await dead.count() == 0
    await run_workers(
        [Worker(Executor(store), [Flaky()], settings=FAST)],
        lambda: _has(redis.get(f"{prefix}:flaky-done"), b"1"),
    )
    assert await dead.count() == 0


async def _has(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def test_replay_reaches_only_the_handler_that_failed(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    Flaky.calls = []
    await store.append("acct", [Ping(n=1)])
    dead = DeadLetters(redis, store.keyspace)
    await run_workers(
        [Worker(Executor(store), [Flaky(), Recorder()], settings=FAST)],
        lambda: _has(dead.count(), 1),
    )
    assert await seen_versions(store, "acct") == [1]
    await redis.set(f"{prefix}:fixed", 1)
    await dead.replay_all()
    await run_workers(
        [Worker(Executor(store), [Flaky(), Recorder()], settings=FAST)],
        lambda: _has(redis.get(f"{prefix}:flaky-done"), b"1"),
    )
    assert await seen_versions(store, "acct") == [1]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"v": b"1", b"d": b"x"}, "lacks a valid s/v/d field"),
        ({b"s": b"junk", b"v": b"not-a-number", b"d": b"x"}, "lacks a valid s/v/d field"),
        ({b"s": b"junk", b"v": b"1", b"d": b"\xc1\xff not msgpack"}, "envelope is not valid"),
        ({b"s": b"junk", b"v": b"1", b"d": b"\x93\x01\x02\x03"}, "envelope is not valid"),
    ],
)
async def test_garbage_in_the_log_goes_to_dead_letters(
    redis: Redis, prefix: str, fields: dict[bytes, bytes], reason: str
) -> None:
    store = make_store(redis, prefix)
    await redis.xadd(store.keyspace.log(0), fields)
    await store.append("after", [Ping()])
    dead = DeadLetters(redis, store.keyspace)
    worker = Worker(Executor(store), [Recorder()], settings=FAST)

    async def done() -> bool:
        return await dead.count() == 1 and await seen_versions(store, "after") == [1]

    await run_workers([worker], done)
    [letter] = await dead.list()
    assert letter.error_type == "EventDecodeError"
    assert reason in letter.error


async def test_unknown_event_type_for_a_wanted_name_goes_to_dead_letters(
    redis: Redis, prefix: str
) -> None:
    writer = EventStore(redis, EventRegistry([Ping]), keyspace=Keyspace(prefix=prefix))
    await writer.append("x", [Ping()])
    # Corrupt the payload of a wanted type: the payload is not a Ping.
    _, fields = (await redis.xrange(writer.keyspace.log(0)))[0]
    items = msgspec.msgpack.decode(fields[b"d"])
    items[5] = {"n": "abc"}  # the payload of a Ping, with a str where an int belongs
    bad = msgspec.msgpack.encode(items)
    await redis.xadd(writer.keyspace.log(0), {b"s": b"y", b"v": b"1", b"d": bad})
    dead = DeadLetters(redis, writer.keyspace)
    store = make_store(redis, prefix, shards=1)
    await run_workers(
        [Worker(Executor(store), [Recorder()], settings=FAST)],
        lambda: _has(dead.count(), 1),
    )
    [letter] = await dead.list()
    assert letter.error_type == "EventDecodeError"
    assert "payload is not valid" in letter.error
    assert await seen_versions(store, "x") == [1]


async def test_a_dead_consumer_is_taken_over_with_its_streams(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.append("a", [Ping(), Ping()])
    dead_consumer = GroupConsumer(
        redis, store.keyspace, 0, Recorder.name, "dead", claim_timeout_ms=200
    )
    await dead_consumer.ensure_group()
    got = await dead_consumer.read(1)
    assert [e.stream_id for e in got.entries] == ["a"]
    # While "dead" is alive, a later entry of its stream is handed to it.
    other = GroupConsumer(redis, store.keyspace, 0, Recorder.name, "other", claim_timeout_ms=200)
    assert (await other.read(10)).entries == []
    assert await redis.hget(store.keyspace.handoffs(0, Recorder.name), "dead") is not None

    class QuickRecorder(Recorder):
        claim_timeout = 0.2

    worker = Worker(Executor(store), [QuickRecorder()], settings=FAST)

    async def done() -> bool:
        return await seen_versions(store, "a") == [1, 2] and await settled(redis, store)

    await run_workers([worker], done)
    names = {c["name"] for c in await redis.xinfo_consumers(store.keyspace.log(0), Recorder.name)}
    assert b"dead" not in names


async def test_taking_over_keeps_stream_order(redis: Redis, prefix: str) -> None:
    """Entries handed to a consumer that then dies come back in order, all at once."""
    store = make_store(redis, prefix, shards=1)
    owner = GroupConsumer(redis, store.keyspace, 0, "g", "owner", claim_timeout_ms=100)
    other = GroupConsumer(redis, store.keyspace, 0, "g", "other", claim_timeout_ms=100)
    await owner.ensure_group()
    await store.append("s", [Ping(n=1)])
    assert len((await owner.read(10)).entries) == 1
    await store.append("s", [Ping(n=2), Ping(n=3)])
    assert (await other.read(10)).entries == []  # handed to the live owner
    await anyio.sleep(0.15)  # the owner goes silent past the timeout
    await store.append("s", [Ping(n=4)])
    taken = (await other.read(10)).entries
    assert [int(e.fields[b"v"]) for e in taken] == [1, 2, 3, 4]
    assert [e.deliveries for e in taken] == [1, 1, 1, 1]  # held, never started: no blame
    assert await redis.hget(store.keyspace.stream_owners(0, "g"), "s") == b"other"


async def test_poison_entry_redelivered_too_often_goes_to_dead_letters(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.append("p", [Ping()])
    crashy = GroupConsumer(redis, store.keyspace, 0, Recorder.name, "crashy", claim_timeout_ms=1)
    await crashy.ensure_group()
    [entry] = (await crashy.read(1)).entries
    for n in range(FAST.max_deliveries - 1):  # each crash after a start is one more delivery
        await crashy.record_started([entry.log_id])
        await anyio.sleep(0.005)
        crashy = GroupConsumer(
            redis, store.keyspace, 0, Recorder.name, f"crashy{n}", claim_timeout_ms=1
        )
        entries, dead = await crashy.take_over_dead()
        assert len(entries) == 1
        assert entries[0].deliveries == n + 2
    await crashy.record_started([entry.log_id])

    class QuickRecorder(Recorder):
        claim_timeout = 0.05

    dead = DeadLetters(redis, store.keyspace)
    await anyio.sleep(0.06)
    await run_workers(
        [Worker(Executor(store), [QuickRecorder()], settings=FAST)], lambda: _has(dead.count(), 1)
    )
    [letter] = await dead.list()
    assert "without acknowledgement" in letter.error
    assert letter.deliveries > FAST.max_deliveries
    assert await seen_versions(store, "p") == []


class Slow(EventHandler):
    name = "slow"
    events = (Ping,)
    retry = FixedDelay(interval=0, max_retries=0)
    started: list[int] = []
    finished: list[int] = []

    async def handle(self, event, ctx: HandlerContext) -> None:  # type: ignore[no-untyped-def]
        type(self).started.append(event.data.n)
        await anyio.sleep(event.data.n / 1000)
        type(self).finished.append(event.data.n)


async def test_graceful_shutdown_finishes_in_flight_and_leaves_the_rest(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    Slow.started, Slow.finished = [], []
    await store.append("quick", [Ping(n=50)])
    await store.append("stuck", [Ping(n=60_000)])
    settings = WorkerSettings(concurrency=4, block_ms=50, shutdown_timeout=0.5)
    worker = Worker(Executor(store), [Slow()], settings=settings)
    stop = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            while len(Slow.started) < 2:  # both in flight, "quick" not yet finished
                await anyio.sleep(0.002)
            stop.set()
    assert Slow.finished == [50]
    pending = await redis.xpending_range(store.keyspace.log(0), Slow.name, "-", "+", 10)
    assert len(pending) == 1  # "stuck" is left for others...
    alive = await redis.hget(store.keyspace.consumers_alive(0, Slow.name), worker.name)
    assert alive == b"0"  # ...who may take it over at once
    taker = GroupConsumer(redis, store.keyspace, 0, Slow.name, "taker")
    taken, dead = await taker.take_over_dead()
    assert dead == [worker.name]
    assert [e.stream_id for e in taken] == ["stuck"]
    assert not await redis.exists(store.keyspace.heartbeat(worker.name))


async def test_heartbeat_describes_the_worker(redis: Redis, prefix: str) -> None:
    from rsaga.health import Heartbeat

    store = make_store(redis, prefix)
    worker = Worker(Executor(store), [Recorder()], settings=FAST, name="hb-test")

    async def beating() -> bool:
        return bool(await redis.exists(store.keyspace.heartbeat("hb-test")))

    stop = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            while not await beating():
                await anyio.sleep(0.01)
            raw = await redis.get(store.keyspace.heartbeat("hb-test"))
            ttl = await redis.pttl(store.keyspace.heartbeat("hb-test"))
            stop.set()
    beat = msgspec.json.decode(raw, type=Heartbeat)
    assert beat.consumer == "hb-test"
    assert beat.handlers == ["recorder"]
    assert 0 < ttl <= FAST.heartbeat_ttl * 1000


async def test_trim_removes_only_what_every_group_acknowledged(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    await store.append("t", [Ping(), Ping(), Ping()])
    log_key = store.keyspace.log(0)
    fast = GroupConsumer(redis, store.keyspace, 0, "fast", "c")
    slow = GroupConsumer(redis, store.keyspace, 0, "slow", "c")
    await fast.ensure_group()
    await slow.ensure_group()
    got = await fast.read(10)
    await fast.ack(got.entries)
    first = (await slow.read(1)).entries  # slow holds entry 1 pending
    assert len(first) == 1
    await script("trim_log")(redis, [log_key], [0])
    assert await redis.xlen(log_key) == 3  # nothing below slow's pending entry
    await slow.ack(first)
    rest = (await slow.read(10)).entries
    await slow.ack(rest)
    await script("trim_log")(redis, [log_key], [0])
    assert await redis.xlen(log_key) <= 1
    await script("trim_log")(redis, [log_key], [3_600_000])


def test_handler_names_are_validated() -> None:
    class Bad(EventHandler):
        name = "has space"
        events = (Ping,)

    with pytest.raises(ValidationError, match="name must be"):
        Bad.validate()


class Note(StatelessCommand, frozen=True):
    """Always appends: applying it twice would show as two events."""

    target: StreamId


    def handle(self, state: None) -> dict[str, list[msgspec.Struct]]:
        return {self.target: [Seen(version=0)]}


class CrashAfterEffect(EventHandler):
    """Executes two commands, then fails the first time: the retry must not repeat them."""

    name = "crash-after-effect"
    events = (Ping,)
    retry = FixedDelay(interval=0, max_retries=2)
    attempts: list[int] = []

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        first = await ctx.execute(Note(target=StreamId(f"notes-{event.stream_id}")))
        second = await ctx.execute(Note(target=StreamId(f"notes-{event.stream_id}")))
        type(self).attempts.append(ctx.attempt)
        assert first.duplicate == second.duplicate == (ctx.attempt > 1)
        if ctx.attempt == 1:
            raise RuntimeError("crash after the effect")


async def test_commands_of_a_retried_handler_apply_once(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    CrashAfterEffect.attempts = []
    await store.append("x", [Ping()])

    async def done() -> bool:
        return CrashAfterEffect.attempts == [1, 2] and await settled(redis, store)

    await run_workers([Worker(Executor(store), [CrashAfterEffect()], settings=FAST)], done)
    notes = (await store.read("notes-x")).events
    assert len(notes) == 2  # two distinct commands, each applied once
    assert len({e.command_id for e in notes}) == 2


async def test_a_graceful_leave_blames_nothing(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.append("g", [Ping(), Ping()])
    leaver = GroupConsumer(redis, store.keyspace, 0, "grp", "leaver", claim_timeout_ms=60_000)
    await leaver.ensure_group()
    assert len((await leaver.read(10)).entries) == 2
    await leaver.keep_alive(leaving=True)
    taker = GroupConsumer(redis, store.keyspace, 0, "grp", "taker", claim_timeout_ms=60_000)
    taken, dead = await taker.take_over_dead()
    assert dead == ["leaver"]
    assert [e.deliveries for e in taken] == [1, 1]  # a graceful stop is no crash


async def test_a_stream_field_that_is_not_text_does_not_pin_anything(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix)
    log_key = store.keyspace.log(0)
    await redis.xadd(log_key, {b"s": b"\xff\xfe", b"v": b"1", b"d": b"x"})
    await redis.xadd(log_key, {b"s": b"", b"v": b"1", b"d": b"x"})
    await run_workers(
        [Worker(Executor(store), [Recorder()], settings=FAST)], lambda: settled(redis, store)
    )
    assert await DeadLetters(redis, store.keyspace).count() == 2
    assert await redis.hgetall(store.keyspace.in_flight(0, Recorder.name)) == {}
    assert await redis.hgetall(store.keyspace.stream_owners(0, Recorder.name)) == {}


async def test_a_late_ack_from_a_consumer_taken_over_changes_nothing(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.append("z", [Ping()])
    zombie = GroupConsumer(redis, store.keyspace, 0, "grp", "zombie", claim_timeout_ms=1)
    await zombie.ensure_group()
    [entry] = (await zombie.read(10)).entries
    await anyio.sleep(0.01)
    heir = GroupConsumer(redis, store.keyspace, 0, "grp", "heir", claim_timeout_ms=1)
    taken, _ = await heir.take_over_dead()
    assert [e.log_id for e in taken] == [entry.log_id]
    acked, _ = await zombie.ack([entry])
    assert acked == 0
    pending = await redis.xpending_range(store.keyspace.log(0), "grp", "-", "+", 10)
    assert [p["consumer"] for p in pending] == [b"heir"]
    assert await redis.hget(store.keyspace.in_flight(0, "grp"), "z") == b"1"
    assert await redis.hget(store.keyspace.stream_owners(0, "grp"), "z") == b"heir"


async def test_a_read_that_handed_everything_away_does_not_wait(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.append("h", [Ping()])
    owner = GroupConsumer(redis, store.keyspace, 0, "grp", "owner")
    await owner.ensure_group()
    await owner.read(10)
    await store.append("h", [Ping()])
    reader = GroupConsumer(redis, store.keyspace, 0, "grp", "reader")
    result = await reader.read(10)
    assert result.entries == []
    assert result.last_id == ""  # it read something: more may be waiting, so no blocking


async def test_entries_already_pending_on_the_consumer_are_picked_up_at_start(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.append("r", [Ping(), Ping()])
    earlier = GroupConsumer(redis, store.keyspace, 0, Recorder.name, "same-name")
    await earlier.ensure_group()
    assert len((await earlier.read(10)).entries) == 2  # then the process died
    worker = Worker(Executor(store), [Recorder()], settings=FAST, name="same-name")

    async def done() -> bool:
        return await seen_versions(store, "r") == [1, 2] and await settled(redis, store)

    await run_workers([worker], done)


async def test_handed_entries_beyond_a_batch_are_not_overtaken(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    owner = GroupConsumer(redis, store.keyspace, 0, "grp", "owner")
    other = GroupConsumer(redis, store.keyspace, 0, "grp", "other")
    await owner.ensure_group()
    await store.append("s", [Ping(n=1)])
    assert len((await owner.read(1)).entries) == 1
    await store.append("s", [Ping(n=n) for n in range(2, 7)])
    assert (await other.read(10)).entries == []  # all five handed to the owner
    await store.append("s", [Ping(n=7)])
    seen = []
    for _ in range(3):
        seen.append([int(e.fields[b"v"]) for e in (await owner.read(2)).entries])
    assert seen == [[2, 3], [4, 5], [6, 7]]


class Deep(msgspec.Struct, frozen=True):
    """An event with a field of any shape: nesting is up to the writer."""

    x: Any


class DeepReader(EventHandler):
    name = "deep-reader"
    events = (Deep,)
    retry = FixedDelay(interval=0, max_retries=0)

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        raise AssertionError("an undecodable event reached the handler")


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return value


def envelope(type_name: str, payload: bytes, occurred_at_ms: int = 1_700_000_000_000) -> bytes:
    return msgspec.msgpack.encode(
        [bytes(16), type_name, occurred_at_ms, "corr", None, msgspec.Raw(payload)]
    )


async def dead_letter_of_planted_entry(
    redis: Redis, prefix: str, fields: dict[bytes, bytes], handler: EventHandler
) -> DeadLetter:
    """Plant `fields` in the log before a good entry; run a worker until both are done."""
    store = EventStore(
        redis, EventRegistry([Ping, Seen, Deep]), keyspace=Keyspace(prefix=prefix)
    )
    await redis.xadd(store.keyspace.log(0), fields)
    await store.append("after", [Ping()])
    dead = DeadLetters(redis, store.keyspace)
    worker = Worker(Executor(store), [handler, Recorder()], settings=FAST)

    async def done() -> bool:
        return await dead.count() == 1 and await seen_versions(store, "after") == [1]

    await run_workers([worker], done)
    [letter] = await dead.list()
    return letter


POISON_ENTRIES = {
    "time out of range": (
        "Ping",
        envelope("Ping", msgspec.msgpack.encode(Ping()), occurred_at_ms=10**15),
        "occurred_at_ms 1000000000000000 is out of range",
    ),
    "nested past the stack": (
        "Deep",
        envelope("Deep", b"\x81\xa1x" + b"\x91" * 20_000 + b"\x01"),  # {"x": [[[..1..]]]}
        "RecursionError",
    ),
    "log type disagrees with the envelope": (
        "Ping",
        envelope("Stranger", msgspec.msgpack.encode({"a": 1})),
        "the log names type 'Ping' but the envelope holds 'Stranger'",
    ),
}


@pytest.mark.parametrize("poison", sorted(POISON_ENTRIES))
async def test_an_undecodable_entry_is_a_dead_letter_not_a_crash(
    redis: Redis, prefix: str, poison: str
) -> None:
    logged_type, blob, reason = POISON_ENTRIES[poison]
    fields = {b"s": b"bad", b"v": b"1", b"t": logged_type.encode(), b"d": blob}
    letter = await dead_letter_of_planted_entry(redis, prefix, fields, DeepReader())
    assert letter.error_type == "EventDecodeError"
    assert reason in letter.error


async def test_the_delivery_count_is_checked_before_decoding(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    log_key = store.keyspace.log(0)
    await redis.xadd(log_key, {b"s": b"x", b"v": b"1", b"t": b"Ping", b"d": b"\xc1"})
    crashy = GroupConsumer(redis, store.keyspace, 0, Recorder.name, "crashy")
    await crashy.ensure_group()
    [entry] = (await crashy.read(1)).entries
    await redis.xclaim(log_key, Recorder.name, "crashy", 0, [entry.log_id], retrycount=9)
    await crashy.keep_alive(leaving=True)  # what every crash before left

    class QuickRecorder(Recorder):
        claim_timeout = 0.1

    dead = DeadLetters(redis, store.keyspace)
    worker = Worker(Executor(store), [QuickRecorder()], settings=FAST)
    await run_workers([worker], lambda: _has(dead.count(), 1))
    [letter] = await dead.list()
    assert "without acknowledgement" in letter.error


async def test_an_event_nested_too_deep_is_refused_at_append(redis: Redis, prefix: str) -> None:
    store = EventStore(redis, EventRegistry([Deep]), keyspace=Keyspace(prefix=prefix))
    await store.append("ok", [Deep(nested(MAX_EVENT_NESTING - 1))])
    with pytest.raises(ValidationError, match="nests containers more than 64 deep"):
        await store.append("deep", [Deep({"k": nested(MAX_EVENT_NESTING)})])
    assert await store.version("deep") == 0


async def test_a_take_over_blames_only_the_entries_a_handler_started(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    for stream_id in "abcde":
        await store.append(stream_id, [Ping(), Ping()])
    crashed = GroupConsumer(redis, store.keyspace, 0, "grp", "crashed", claim_timeout_ms=1)
    await crashed.ensure_group()
    held = (await crashed.read(100)).entries
    assert len(held) == 10
    first, second = held[0], held[1]
    await crashed.record_started([first.log_id, second.log_id])
    await crashed.ack([first])  # one done, one running, 8 held
    await anyio.sleep(0.005)
    heir = GroupConsumer(redis, store.keyspace, 0, "grp", "heir", claim_timeout_ms=1)
    taken, dead = await heir.take_over_dead()
    assert dead == ["crashed"]
    assert {e.log_id: e.deliveries for e in taken} == {
        e.log_id: 2 if e is second else 1 for e in held[1:]
    }


async def test_a_dead_consumers_streams_are_spread_over_the_live_consumers(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    streams = [f"s{n}" for n in range(6)]
    for stream_id in streams:
        await store.append(stream_id, [Ping(n=1), Ping(n=2)])

    def consumer(name: str) -> GroupConsumer:
        return GroupConsumer(redis, store.keyspace, 0, "grp", name, claim_timeout_ms=100)

    dead, heir, peer = consumer("dead"), consumer("heir"), consumer("peer")
    await dead.ensure_group()
    assert len((await dead.read(100)).entries) == 12
    await anyio.sleep(0.15)
    await peer.keep_alive()
    mine, _ = await heir.take_over_dead()
    theirs = (await peer.read(100)).entries
    assert len(mine) == len(theirs) == 6
    for entries in (mine, theirs):
        by_stream: dict[str, list[int]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream_id, []).append(int(entry.fields[b"v"]))
        assert all(versions == [1, 2] for versions in by_stream.values())
    owners = await redis.hgetall(store.keyspace.stream_owners(0, "grp"))
    assert sorted(owners.values()) == [b"heir"] * 3 + [b"peer"] * 3
