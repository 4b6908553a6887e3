"""Snapshots of folded states, on fakeredis and on a real redis-server.

Executors here run without a state cache (or are new), so every command folds
from Redis: from the snapshot when there is a matching one, else from version 1.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec
import pytest
from redis.asyncio import Redis
from test_statecache import CountingStore

from rsaga import Command, EventRegistry, EventStore, Executor, Keyspace, StreamId, Writes
from rsaga.events import RecordedEvent
from rsaga.processes import (
    AdvanceTrigger,
    Decision,
    ProcessInfo,
    ProcessManager,
    ProcessRunner,
    StartTrigger,
    Trigger,
)
from rsaga.snapshots import Snapshot


class Counted(msgspec.Struct, frozen=True):
    n: int


class Tally(msgspec.Struct):
    count: int = 0
    total: int = 0


class Count(Command[Tally], frozen=True, tag="count"):
    """Adds `n` to the tally of one stream; every 3 events a snapshot."""

    snapshot_every: ClassVar[int] = 3
    stream: StreamId
    n: int = 1

    def initial_state(self) -> Tally:
        return Tally()

    def apply(self, state: Tally, event: RecordedEvent) -> Tally:
        state.count += 1
        state.total += event.data.n
        return state

    def handle(self, state: Tally) -> Writes:
        return {self.stream: [Counted(self.n)]}


class TallyV0(msgspec.Struct):
    """An older state type of the same fold: a different shape."""

    count: int = 0


class CountV0(Command[TallyV0], frozen=True, tag="count"):
    """The same fold name with the older state type."""

    snapshot_every: ClassVar[int] = 3
    stream: StreamId

    def initial_state(self) -> TallyV0:
        return TallyV0()

    def apply(self, state: TallyV0, event: RecordedEvent) -> TallyV0:
        state.count += 1
        return state

    def handle(self, state: TallyV0) -> Writes:
        return {self.stream: [Counted(1)]}


class Peek(Command[Tally], frozen=True, tag="peek"):
    """Reads the tally and writes nothing: records the state it saw."""

    snapshot_every: ClassVar[int] = 3
    stream: StreamId
    seen: list[Tally] = msgspec.field(default_factory=list)

    def initial_state(self) -> Tally:
        return Tally()

    def apply(self, state: Tally, event: RecordedEvent) -> Tally:
        return Count.apply(self, state, event)  # type: ignore[arg-type]

    def handle(self, state: Tally) -> Writes:
        self.seen.append(state)
        return {}


def make(redis: Redis, prefix: str) -> tuple[CountingStore, Executor]:
    store = CountingStore(redis, EventRegistry([Counted]), keyspace=Keyspace(prefix=prefix))
    return store, Executor(store, state_cache_size=0)


async def stored(redis: Redis, store: EventStore, fold: str, stream: str) -> Snapshot:
    version, blob = await redis.hmget(store.keyspace.snapshot(stream, fold), ["v", "d"])
    snapshot = msgspec.msgpack.decode(blob, type=Snapshot)
    assert int(version) == snapshot.version
    return snapshot


async def test_a_fold_starts_from_its_snapshot_and_reads_only_what_follows(
    redis: Redis, prefix: str
) -> None:
    store, executor = make(redis, prefix)
    for n in range(1, 8):
        await executor.execute(Count(stream=StreamId("c"), n=n), idempotency_key=f"k{n}")
    # Written in the commits that checked versions 3 and 6.
    assert (await stored(redis, store, "count", "c")).version == 6
    store.reads.clear()
    peek = Peek(stream=StreamId("c"))
    await executor.execute(peek)
    assert peek.seen == [Tally(count=7, total=28)]
    assert not await redis.exists(store.keyspace.snapshot("c", "peek"))  # wrote nothing
    assert store.reads == [[("c", 1)]]  # a fold of its own: the count snapshot is not its
    store.reads.clear()
    await executor.execute(Count(stream=StreamId("c"), n=100))
    assert store.reads == [[("c", 7)]]
    # A key applied before the snapshot is still a duplicate after it.
    again = await executor.execute(Count(stream=StreamId("c"), n=1), idempotency_key="k2")
    assert again.duplicate
    assert await store.version("c") == 8


async def test_a_snapshot_of_an_older_state_type_is_ignored_and_rebuilt(
    redis: Redis, prefix: str
) -> None:
    store, executor = make(redis, prefix)
    for _ in range(4):
        await executor.execute(CountV0(stream=StreamId("c")))
    old = await stored(redis, store, "count", "c")
    assert old.version == 3
    store.reads.clear()
    await executor.execute(Count(stream=StreamId("c"), n=10))
    # The old snapshot came with the read, was not taken for a Tally: read from 1.
    assert store.reads == [[("c", 4)], [("c", 1)]]
    new = await stored(redis, store, "count", "c")
    assert new.fingerprint != old.fingerprint
    assert new.version == 4
    assert msgspec.msgpack.decode(new.state, type=Tally) == Tally(count=4, total=4)
    peek = Peek(stream=StreamId("c"))
    await executor.execute(peek)
    assert peek.seen == [Tally(count=5, total=14)]


@pytest.mark.parametrize(
    "blob",
    [b"garbage", msgspec.msgpack.encode(["x"]), None],
    ids=["bytes", "shape", "state"],
)
async def test_a_snapshot_that_does_not_decode_is_ignored(
    redis: Redis, prefix: str, blob: bytes | None
) -> None:
    store, executor = make(redis, prefix)
    for _ in range(4):
        await executor.execute(Count(stream=StreamId("c"), n=2))
    good = await stored(redis, store, "count", "c")
    if blob is None:  # a matching fingerprint over bytes that are not a Tally
        blob = msgspec.msgpack.encode(Snapshot(good.version, good.fingerprint, b"\xc1", []))
    await redis.hset(store.keyspace.snapshot("c", "count"), "d", blob)
    peek = Peek(stream=StreamId("c"))
    await executor.execute(peek)
    assert peek.seen == [Tally(count=4, total=8)]


async def test_a_snapshot_ahead_of_its_stream_is_not_trusted(redis: Redis, prefix: str) -> None:
    store, executor = make(redis, prefix)
    for _ in range(4):
        await executor.execute(Count(stream=StreamId("c"), n=2))
    await redis.delete(store.keyspace.stream("c"))
    await store.append("c", [Counted(5)])
    peek = Peek(stream=StreamId("c"))
    await executor.execute(peek)
    assert peek.seen == [Tally(count=1, total=5)]


class Steps(msgspec.Struct):
    advances: int = 0


class Stepper(ProcessManager[Steps]):
    """Counts advances in its state; snapshots every 4 events."""

    name = "stepper"
    snapshot_every = 4

    def correlate(self, event: Any) -> str | None:
        return None

    def initial_state(self) -> Steps:
        return Steps()

    def apply(self, state: Steps, event: RecordedEvent) -> Steps:
        if isinstance(event.data, Counted):
            state.advances += 1
        return state

    def decide(self, state: Steps, trigger: Trigger, process: ProcessInfo) -> Decision:
        match trigger:
            case StartTrigger():
                return Decision()
            case AdvanceTrigger(data="done"):
                return Decision(complete=True) if state.advances == 6 else Decision()
            case AdvanceTrigger():
                return Decision(events=[Counted(1)])
        return Decision()


async def test_a_process_continues_from_its_snapshot_on_another_runner(
    redis: Redis, prefix: str
) -> None:
    keyspace = Keyspace(prefix=prefix)
    store = CountingStore(redis, EventRegistry([Counted]), keyspace=keyspace)
    first = ProcessRunner(Executor(store), [Stepper()])
    await first.start("stepper", "p")
    for i in range(6):
        await first.advance("stepper", "p", i, key=f"a{i}")
    snapshot = await stored(redis, store, "process.stepper", Stepper.stream_id("p"))
    assert snapshot.version >= 4
    store.reads.clear()
    second = ProcessRunner(Executor(store, state_cache_size=0), [Stepper()])
    await second.advance("stepper", "p", 0, key="a0")  # a duplicate: nothing written
    await second.advance("stepper", "p", "done", key="done")
    assert store.reads[-1] == [(Stepper.stream_id("p"), snapshot.version + 1)]
    info, state = first.fold(
        Stepper(), "p", (await store.read(Stepper.stream_id("p"))).events
    )
    assert (info.status, state) == ("completed", Steps(6))
