"""The executor's state cache on fakeredis and on a real redis-server.

Two executors over the same streams stand for two workers: each has its own
cache, so what one writes makes the other's cache stale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import pytest
from bank import (
    BANK_EVENTS,
    Deposit,
    Deposited,
    Ledger,
    OpenAccount,
    Transfer,
    Withdraw,
    Withdrawn,
    balance,
)
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from rsaga import (
    DomainError,
    EventRegistry,
    EventStore,
    Executor,
    Keyspace,
    StatelessCommand,
    StreamId,
    Writes,
)
from rsaga.processes import (
    AdvanceTrigger,
    Decision,
    ProcessCompleted,
    ProcessInfo,
    ProcessManager,
    ProcessRunner,
    StartTrigger,
    Timeout,
    TimeoutTrigger,
    Trigger,
    decode_timeout,
)
from rsaga.statecache import CachedFold, StateCache
from rsaga.store import StreamSlice


class CountingStore(EventStore):
    """Records what each read asked for: (stream id, from version) pairs."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.reads: list[list[tuple[str, int]]] = []
        self.events_read = 0

    async def read_streams(
        self,
        stream_ids: Sequence[str],
        *,
        from_version: int = 1,
        from_versions: Any = None,
        snapshots: Any = None,
    ) -> dict[str, StreamSlice]:
        found = await super().read_streams(
            stream_ids, from_version=from_version, from_versions=from_versions,
            snapshots=snapshots,
        )
        starts = dict.fromkeys(stream_ids, from_version) | dict(from_versions or {})
        for stream_id, read in found.items():
            if read.snapshot is not None:  # the read went on after the snapshot
                starts[stream_id] = msgspec.msgpack.decode(read.snapshot)[0] + 1
        self.reads.append([(s, starts[s]) for s in stream_ids])
        self.events_read += sum(len(s.events) for s in found.values())
        return found


def stores(redis: Redis, prefix: str) -> tuple[CountingStore, EventStore]:
    keyspace = Keyspace(prefix=prefix)
    registry = EventRegistry(BANK_EVENTS)
    return CountingStore(redis, registry, keyspace=keyspace), EventStore(
        redis, registry, keyspace=keyspace
    )


def acct(name: str) -> StreamId:
    return StreamId(name)


async def with_account(
    redis: Redis, prefix: str, initial: int
) -> tuple[CountingStore, EventStore, Executor]:
    """Stores over one keyspace, and an executor (on the counting one) that opened "a"."""
    store, plain = stores(redis, prefix)
    executor = Executor(store)
    await executor.execute(OpenAccount(account=acct("a"), owner="a", initial=initial))
    return store, plain, executor


async def test_a_cached_fold_skips_the_read_and_folds_what_it_wrote(
    redis: Redis, prefix: str
) -> None:
    store, _, executor = await with_account(redis, prefix, 10)
    store.reads.clear()
    for _ in range(3):
        await executor.execute(Deposit(account=acct("a"), amount=1))
    await executor.execute(Withdraw(account=acct("a"), amount=13))
    # Deposit and Withdraw are different folds: each reads once, then writes unread.
    assert store.reads == [[("a", 1)], [("a", 1)]]
    with pytest.raises(DomainError):
        await executor.execute(Withdraw(account=acct("a"), amount=1))
    # A refusal is never decided on unread state: it reads what is new (nothing).
    assert store.reads[-1] == [("a", 7)]
    assert [e.data for e in (await store.read("a")).events][-1] == Withdrawn(13)


async def test_a_stale_cache_after_another_executor_wrote_reads_only_the_change(
    redis: Redis, prefix: str
) -> None:
    store, plain = stores(redis, prefix)
    mine, theirs = Executor(store), Executor(plain)
    await mine.execute(OpenAccount(account=acct("a"), owner="a", initial=100))
    await mine.execute(OpenAccount(account=acct("b"), owner="b"))
    await mine.execute(Transfer(source=acct("a"), target=acct("b"), amount=10))  # cached: a@3 b@2
    for _ in range(3):
        await theirs.execute(Deposit(account=acct("a"), amount=5))  # a -> 6, unseen by mine
    store.reads.clear()
    store.events_read = 0
    result = await mine.execute(Transfer(source=acct("a"), target=acct("b"), amount=10))
    assert result.attempts == 2  # the unread attempt conflicted
    assert store.reads == [[("a", 4), ("b", 3)]]  # the retry read from the versions it saw
    assert store.events_read == 3
    assert result.versions == {"a": 7, "b": 3}
    balances = {s: sum(
        e.data.amount if isinstance(e.data, Deposited) else -e.data.amount
        for e in (await plain.read(s)).events if isinstance(e.data, Deposited | Withdrawn)
    ) for s in ("a", "b")}
    assert balances == {"a": 95, "b": 20}


async def test_a_refusal_on_stale_state_is_checked_against_fresh_state(
    redis: Redis, prefix: str
) -> None:
    _, plain, mine = await with_account(redis, prefix, 10)
    theirs = Executor(plain)
    await mine.execute(Withdraw(account=acct("a"), amount=5))  # cached: balance 5
    await theirs.execute(Deposit(account=acct("a"), amount=100))
    result = await mine.execute(Withdraw(account=acct("a"), amount=50))
    assert result.attempts == 1
    assert result.versions == {"a": 5}


async def test_a_key_another_executor_applied_is_a_duplicate_for_a_stale_cache(
    redis: Redis, prefix: str
) -> None:
    store, plain = stores(redis, prefix)
    mine, theirs = Executor(store), Executor(plain)
    await mine.execute(OpenAccount(account=acct("a"), owner="a"))
    await mine.execute(Deposit(account=acct("a"), amount=1), idempotency_key="k1")
    first = await mine.execute(Deposit(account=acct("a"), amount=1), idempotency_key="k1")
    assert first.duplicate
    await theirs.execute(Deposit(account=acct("a"), amount=1), idempotency_key="k2")
    again = await mine.execute(Deposit(account=acct("a"), amount=1), idempotency_key="k2")
    assert again.duplicate
    assert [e.command_id for e in (await plain.read("a")).events] == [None, "k1", "k2"]


async def test_a_stream_deleted_under_a_cache_is_folded_again_from_the_start(
    redis: Redis, prefix: str
) -> None:
    _, plain, mine = await with_account(redis, prefix, 10)
    await mine.execute(Deposit(account=acct("a"), amount=1))  # cached: a@3, balance 11
    await redis.delete(plain.keyspace.stream("a"))
    await plain.append("a", [Deposited(1)])  # a@1 now, never opened
    with pytest.raises(DomainError, match="not open"):
        await mine.execute(Deposit(account=acct("a"), amount=1))


def test_the_cache_keeps_the_newest_entry_and_evicts_the_least_recently_used() -> None:
    cache = StateCache(2)
    cache.put("x", CachedFold({"s": 3}, "new", set()))
    cache.put("x", CachedFold({"s": 2}, "old", set()))
    assert cache.copy("x") == CachedFold({"s": 3}, "new", set())
    cache.put("y", CachedFold({"s": 1}, 2, set()))
    cache.copy("x")  # used: "y" is now the least recently used
    cache.put("z", CachedFold({"s": 1}, 3, set()))
    assert (cache.copy("y"), len(cache)) == (None, 2)
    entry = cache.copy("z")
    assert entry is not None
    entry.keys.add("k")
    assert cache.copy("z") == CachedFold({"s": 1}, 3, set())  # a copy: the entry is intact
    with pytest.raises(ValueError, match="must be >= 1"):
        StateCache(0)


class Reminder(ProcessManager[int]):
    """Start: remind in 10 s; an advance pushes the reminder back (new token); fires once."""

    name = "reminder"

    def correlate(self, event: Any) -> str | None:
        return None

    def initial_state(self) -> int:
        return 0

    def decide(self, state: int, trigger: Trigger, process: ProcessInfo) -> Decision:
        match trigger:
            case StartTrigger():
                return Decision(schedule=[Timeout("remind", after=10)])
            case AdvanceTrigger():
                return Decision(schedule=[Timeout("remind", after=20)])
            case TimeoutTrigger(name="remind"):
                return Decision(complete=True)
        return Decision()


async def test_a_timeout_another_worker_rescheduled_fires_despite_a_stale_cache(
    redis: Redis, prefix: str
) -> None:
    keyspace = Keyspace(prefix=prefix)
    stores_ = [EventStore(redis, EventRegistry(), keyspace=keyspace) for _ in range(2)]
    mine, theirs = (ProcessRunner(Executor(s), [Reminder()]) for s in stores_)
    await mine.start("reminder", "r1")  # mine caches the first token
    await theirs.advance("reminder", "r1", key="push")  # a new token, unseen by mine
    [blob] = await redis.hvals(keyspace.timeout_data(0))
    payload = decode_timeout(blob)
    await mine.on_timeout(payload)
    events = (await stores_[0].read(Reminder.stream_id("r1"))).events
    assert isinstance(events[-1].data, ProcessCompleted)


class Move(Transfer, frozen=True, kw_only=True):
    """`Transfer` folding each account alone: per-stream cache entries and snapshots."""

    fold_per_stream = True
    snapshot_every = 2

    def merge(self, states: Mapping[str, Ledger]) -> Ledger:
        return {k: v for part in states.values() for k, v in part.items()}


async def test_folds_per_stream_share_cache_entries_and_snapshots_across_pairs(
    redis: Redis, prefix: str
) -> None:
    store, plain = stores(redis, prefix)
    mine = Executor(store)
    await mine.execute(OpenAccount(account=acct("a"), owner="a", initial=100))  # a@2
    for name in ("b", "c"):
        await mine.execute(OpenAccount(account=acct(name), owner=name))  # @1
    store.reads.clear()
    await mine.execute(Move(source=acct("a"), target=acct("b"), amount=1))
    await mine.execute(Move(source=acct("a"), target=acct("c"), amount=1))
    await mine.execute(Move(source=acct("a"), target=acct("b"), amount=1))
    # a and b were cached by the first move: only c was read, and only once.
    assert store.reads == [[("a", 1), ("b", 1)], [("a", 4), ("c", 1)]]
    # Snapshots at the versions the commits checked: a at 2 then 4, b at 2.
    for stream_id in ("a", "b"):
        assert await redis.exists(plain.keyspace.snapshot(stream_id, "Move"))
    assert not await redis.exists(plain.keyspace.snapshot("c", "Move"))
    fresh = Executor(store, state_cache_size=0)
    store.reads.clear()
    await fresh.execute(Move(source=acct("b"), target=acct("c"), amount=1))
    assert store.reads == [[("b", 3), ("c", 1)]]
    again = Executor(store, state_cache_size=0)
    store.reads.clear()
    await again.execute(Move(source=acct("a"), target=acct("b"), amount=1))
    assert store.reads == [[("a", 5), ("b", 3)]]
    ledger = await Executor(plain, state_cache_size=0).execute(
        Move(source=acct("c"), target=acct("a"), amount=2)
    )
    assert ledger.versions == {"c": 4, "a": 7}
    totals = {
        s: balance((await plain.read(s)).events) for s in ("a", "b", "c")
    }
    assert totals == {"a": 98, "b": 2, "c": 0}


class DepositOnTop(Deposit, frozen=True, kw_only=True):
    """Deposits only on the balance it expects; anything else is a bug (not a refusal)."""

    expected: int

    def handle(self, state: Ledger) -> Writes:
        if state[self.account].balance != self.expected:
            raise RuntimeError(f"balance {state[self.account].balance}, not {self.expected}")
        return super().handle(state)


async def test_an_error_on_stale_state_is_checked_against_fresh_state(
    redis: Redis, prefix: str
) -> None:
    _, plain, mine = await with_account(redis, prefix, 10)
    await mine.execute(DepositOnTop(account=acct("a"), amount=1, expected=10))  # cached: 11
    await Executor(plain).execute(Deposit(account=acct("a"), amount=4))
    result = await mine.execute(DepositOnTop(account=acct("a"), amount=1, expected=15))
    assert result.versions == {"a": 5}
    with pytest.raises(RuntimeError, match="balance 16, not 15"):
        await mine.execute(DepositOnTop(account=acct("a"), amount=1, expected=15))


async def test_a_cache_ahead_of_redis_after_lost_writes_is_not_trusted(
    redis: Redis, prefix: str
) -> None:
    """Redis crashed and lost the last write: the cache saw it, Redis no longer has it."""
    _, plain, mine = await with_account(redis, prefix, 10)  # a@2
    await mine.execute(Deposit(account=acct("a"), amount=1), idempotency_key="k1")  # a@3
    kept = [e.data for e in (await plain.read("a")).events][:2]
    await redis.delete(plain.keyspace.stream("a"))
    await plain.append("a", kept)  # restarted without the last write: a@2 again
    again = await mine.execute(Deposit(account=acct("a"), amount=1), idempotency_key="k1")
    assert not again.duplicate
    assert again.versions == {"a": 3}
    await mine.execute(Deposit(account=acct("a"), amount=1))
    assert balance((await plain.read("a")).events) == 12


class FailingStore(CountingStore):
    """Fails its next `fail_reads` reads and `fail_commits` commits as a lost connection."""

    fail_reads = 0
    fail_commits = 0

    async def read_streams(self, *args: Any, **kw: Any) -> dict[str, StreamSlice]:
        if self.fail_reads:
            self.fail_reads -= 1
            raise RedisConnectionError("Connection closed by server.")
        return await super().read_streams(*args, **kw)

    async def commit(self, *args: Any, **kw: Any) -> Any:
        if self.fail_commits:
            self.fail_commits -= 1
            raise RedisConnectionError("Connection closed by server.")
        return await super().commit(*args, **kw)


class Tip(StatelessCommand, frozen=True, kw_only=True, tag="tests.Tip"):
    """Deposits 1 whatever the account's state: decides without failing on any state."""

    account: StreamId

    def handle(self, state: None) -> Writes:
        return {self.account: [Deposited(1)]}


async def test_a_read_that_failed_leaves_nothing_to_decide_on_unread(
    redis: Redis, prefix: str
) -> None:
    """An attempt whose first read failed folded no stream: nothing of it is cached, so
    the next attempt reads (once it cached an empty fold, decided on it unread, and
    failed with `UndeclaredStream`)."""
    store = FailingStore(redis, EventRegistry(BANK_EVENTS), keyspace=Keyspace(prefix=prefix))
    await Executor(store).execute(OpenAccount(account=acct("a"), owner="a", initial=10))
    mine = Executor(store)
    store.fail_reads = 1
    with pytest.raises(RedisConnectionError):
        await mine.execute(Tip(account=acct("a")))
    store.reads.clear()
    result = await mine.execute(Tip(account=acct("a")))
    assert store.reads == [[("a", 1)]]
    assert result.versions == {"a": 3}
    assert balance((await store.read("a")).events) == 11


async def test_a_redis_error_forgets_every_cached_fold(redis: Redis, prefix: str) -> None:
    """Redis restarted without a write the cache folded, and another worker wrote the same
    version since: the cache is wrong at a version Redis has. A worker learns of a restart
    only by a failed call, so any Redis error clears its cache."""
    store = FailingStore(redis, EventRegistry(BANK_EVENTS), keyspace=Keyspace(prefix=prefix))
    plain = EventStore(redis, EventRegistry(BANK_EVENTS), keyspace=Keyspace(prefix=prefix))
    mine = Executor(store)
    await mine.execute(OpenAccount(account=acct("a"), owner="a", initial=10))
    await mine.execute(Withdraw(account=acct("a"), amount=5))  # a@3, cached: balance 5
    await mine.execute(OpenAccount(account=acct("b"), owner="b"))
    kept = [e.data for e in (await plain.read("a")).events][:2]
    await redis.delete(plain.keyspace.stream("a"))
    await plain.append("a", kept)  # restarted without the withdrawal: a@2, balance 10
    await Executor(plain).execute(Deposit(account=acct("a"), amount=100))  # a@3, balance 110
    store.fail_commits = 1
    with pytest.raises(RedisConnectionError):  # the worker's first call after the restart
        await mine.execute(Deposit(account=acct("b"), amount=1))
    result = await mine.execute(Withdraw(account=acct("a"), amount=50))
    assert result.versions == {"a": 4}
    assert balance((await plain.read("a")).events) == 60
