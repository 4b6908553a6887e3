"""The command executor on fakeredis and on a real redis-server.

Conflicts are forced deterministically: `InterleavingStore` runs a competing
write between a command's read and its commit, `RendezvousStore` holds every
reader until all of them have read.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import pytest
from bank import (
    BANK_EVENTS,
    BankCommand,
    ChargeFee,
    Deposit,
    Deposited,
    InsufficientFunds,
    Ledger,
    OpenAccount,
    Opened,
    Transfer,
    Withdraw,
    Withdrawn,
    balance,
    keys_under,
    snapshot,
    whole_log,
)
from redis.asyncio import Redis

import rsaga.executor
from rsaga import (
    ConcurrencyConflict,
    CrossShardWrite,
    DomainError,
    EventRegistry,
    EventStore,
    Executor,
    ExponentialBackoff,
    FixedDelay,
    InvalidStreamId,
    Keyspace,
    RetriesExhausted,
    StreamId,
    UndeclaredStream,
    ValidationError,
    Writes,
)
from rsaga.executor import MAX_RESOLVE_ROUNDS
from rsaga.store import CommitResult, StreamSlice, StreamWrite

NO_WAIT = FixedDelay(interval=0, max_retries=10)


class InterleavingStore(EventStore):
    """Runs `before` ahead of each of the first `times` commits: a competing writer."""

    def __init__(
        self, *args: Any, before: Callable[[], Awaitable[object]], times: int = 1, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.before = before
        self.times = times
        self.commits = 0

    async def commit(self, writes: Sequence[StreamWrite], **kw: Any) -> CommitResult:
        self.commits += 1
        if self.commits <= self.times:
            await self.before()
        return await super().commit(writes, **kw)


class RendezvousStore(EventStore):
    """The first `parties` reads each wait until all of them have read."""

    def __init__(self, *args: Any, parties: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.parties = parties
        self.arrived = 0
        self.all_read = anyio.Event()

    async def read_streams(self, stream_ids: Sequence[str], **kw: Any) -> dict[str, StreamSlice]:
        read = await super().read_streams(stream_ids, **kw)
        if self.arrived < self.parties:
            self.arrived += 1
            if self.arrived == self.parties:
                self.all_read.set()
            with anyio.fail_after(5):
                await self.all_read.wait()
        return read


def store_args(
    redis: Redis, prefix: str, shards: int = 1
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Constructor arguments of an `EventStore` (or a subclass) on the test's keys."""
    keyspace = Keyspace(prefix=prefix, shards=shards)
    return (redis, EventRegistry(BANK_EVENTS)), {"keyspace": keyspace}


def plain_store(redis: Redis, prefix: str, shards: int = 1) -> EventStore:
    args, kw = store_args(redis, prefix, shards)
    return EventStore(*args, **kw)


async def open_accounts(store: EventStore, **balances: int) -> None:
    executor = Executor(store)
    for account, initial in balances.items():
        await executor.execute(
            OpenAccount(account=StreamId(account), owner=account, initial=initial)
        )


async def balances(store: EventStore, *accounts: str) -> dict[str, int]:
    read = await store.read_streams(accounts)
    return {a: balance(read[a].events) for a in accounts}


def spy(monkeypatch: pytest.MonkeyPatch, cls: type, name: str = "handle") -> list[Any]:
    """Record every call of `cls.name` (the command it was called on)."""
    calls: list[Any] = []
    original = getattr(cls, name)

    def wrapper(self: Any, *args: Any) -> Any:
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(cls, name, wrapper)
    return calls


def transfer(source: str, target: str, amount: int) -> Transfer:
    return Transfer(source=StreamId(source), target=StreamId(target), amount=amount)


async def stream_lengths(redis: Redis, store: EventStore, *accounts: str) -> dict[str, int]:
    return {a: await redis.xlen(store.keyspace.stream(a)) for a in accounts}


# --- a competing commit between read and commit -------------------------------------


async def test_a_competing_commit_forces_one_retry_on_fresh_state(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = plain_store(redis, prefix)
    await open_accounts(plain, ann=100, bob=0, cat=0)
    competitor: list[Any] = []

    async def b_commits_first() -> None:
        competitor.append(await Executor(plain).execute(transfer("ann", "cat", 50)))

    args, kw = store_args(redis, prefix)
    store = InterleavingStore(*args, before=b_commits_first, **kw)
    handled = spy(monkeypatch, Transfer)
    result = await Executor(store, retry=NO_WAIT).execute(transfer("ann", "bob", 30))

    assert result.attempts == 2
    [b] = competitor
    assert b.attempts == 1
    assert [c.target for c in handled] == ["bob", "cat", "bob"]
    assert store.commits == 2
    # No lost update: both transfers are in ann's stream, A's after B's.
    assert await balances(plain, "ann", "bob", "cat") == {"ann": 20, "bob": 30, "cat": 50}
    ann = (await plain.read("ann")).events
    assert [e.data for e in ann] == [Opened("ann"), Deposited(100), Withdrawn(50), Withdrawn(30)]
    assert [e.version for e in ann] == [1, 2, 3, 4]
    assert result.versions == {"ann": 4, "bob": 2}
    assert [(e.stream_id, e.version) for e in result.events] == [("ann", 4), ("bob", 2)]
    assert result.events == [ann[3], (await plain.read("bob")).events[1]]
    assert await redis.xlen(plain.keyspace.log(0)) == 2 + 1 + 1 + 2 + 2


async def test_a_retry_that_now_overdraws_is_refused_and_writes_nothing(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = plain_store(redis, prefix)
    await open_accounts(plain, ann=100, bob=0, cat=0)

    async def drain_ann() -> None:
        await Executor(plain).execute(transfer("ann", "cat", 80))

    args, kw = store_args(redis, prefix)
    store = InterleavingStore(*args, before=drain_ann, **kw)
    handled = spy(monkeypatch, Transfer)
    log_before = await redis.xlen(plain.keyspace.log(0))
    with pytest.raises(InsufficientFunds):
        await Executor(store, retry=NO_WAIT).execute(transfer("ann", "bob", 30))
    assert len(handled) == 3  # A, B (inside the hook), A again on fresh state
    assert await balances(plain, "ann", "bob", "cat") == {"ann": 20, "bob": 0, "cat": 80}
    assert await redis.xlen(plain.keyspace.log(0)) == log_before + 2


async def test_two_concurrent_commands_one_wins_the_other_retries(
    redis: Redis, prefix: str
) -> None:
    plain = plain_store(redis, prefix)
    await open_accounts(plain, ann=100, bob=10, cat=0)
    args, kw = store_args(redis, prefix)
    store = RendezvousStore(*args, parties=2, **kw)
    executor = Executor(store, retry=NO_WAIT)
    results = {}

    async def run(name: str, command: Transfer) -> None:
        results[name] = await executor.execute(command)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a", transfer("ann", "bob", 30))
        tg.start_soon(run, "b", transfer("bob", "ann", 5))

    assert sorted(r.attempts for r in results.values()) == [1, 2]
    assert await balances(plain, "ann", "bob", "cat") == {"ann": 75, "bob": 35, "cat": 0}
    for account, n in {"ann": 4, "bob": 4}.items():
        read = await plain.read(account)
        assert [e.version for e in read.events] == list(range(1, n + 1))
    winner, loser = sorted(results.values(), key=lambda r: r.attempts)
    assert winner.versions == {"ann": 3, "bob": 3}
    assert loser.versions == {"ann": 4, "bob": 4}


async def test_concurrent_opening_of_one_account_admits_one(
    redis: Redis, prefix: str
) -> None:
    args, kw = store_args(redis, prefix)
    store = RendezvousStore(*args, parties=3, **kw)
    executor = Executor(store, retry=NO_WAIT)
    outcomes: list[object] = []

    async def run(owner: str) -> None:
        try:
            outcomes.append(
                await executor.execute(OpenAccount(account=StreamId("acct"), owner=owner))
            )
        except DomainError as refused:
            outcomes.append(refused)

    async with anyio.create_task_group() as tg:
        for owner in ["ann", "bob", "cat"]:
            tg.start_soon(run, owner)
    refused = [o for o in outcomes if isinstance(o, DomainError)]
    assert len(refused) == 2
    assert all("already open" in str(r) for r in refused)
    events = (await store.read("acct")).events
    assert len(events) == 1
    assert isinstance(events[0].data, Opened)


# --- many concurrent transfers ------------------------------------------------------


async def test_random_concurrent_transfers_keep_the_books(redis: Redis, prefix: str) -> None:
    rng = random.Random(20260611)
    accounts = [f"acct-{i}" for i in range(5)]
    store = plain_store(redis, prefix)
    await open_accounts(store, **dict.fromkeys(accounts, 100))
    executor = Executor(
        store,
        retry=ExponentialBackoff(base=0.0005, cap=0.005, max_retries=500, jitter=1.0),
        rng=random.Random(7),
    )
    commands = []
    for _ in range(200):
        source, target = rng.sample(accounts, 2)
        commands.append(transfer(source, target, rng.randint(1, 70)))

    done = []
    refused = []
    limiter = anyio.CapacityLimiter(25)

    async def run(command: Transfer) -> None:
        async with limiter:
            try:
                done.append(await executor.execute(command))
            except InsufficientFunds:
                refused.append(command)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for command in commands:
                tg.start_soon(run, command)

    assert len(done) + len(refused) == 200
    # 25 commands in flight over 5 accounts: conflicts did happen and were retried.
    assert sum(r.attempts for r in done) > len(done)
    assert done, "some transfers must go through"
    read = await store.read_streams(accounts)
    final = {a: balance(read[a].events) for a in accounts}
    assert sum(final.values()) == 500
    assert min(final.values()) >= 0, final

    # No lost update: each balance is what the successful transfers say it is.
    expected = dict.fromkeys(accounts, 100)
    for result in done:
        for event in result.events:
            delta = event.data.amount
            expected[event.stream_id] += delta if isinstance(event.data, Deposited) else -delta
    assert final == expected

    # Gapless versions 1..n in every stream, in the store and in Redis itself.
    total = 0
    for account in accounts:
        events = read[account].events
        n = len(events)
        total += n
        assert [e.version for e in events] == list(range(1, n + 1))
        assert read[account].version == n
        ids = [i for i, _ in await redis.xrange(store.keyspace.stream(account), "-", "+")]
        assert ids == [f"{v}-0".encode() for v in range(1, n + 1)]
        # Every balance along the way stayed >= 0: overdrafts were refused.
        running = 0
        for event in events:
            running = balance([event]) + running
            assert running >= 0
    assert total == 5 * 2 + 2 * len(done)

    # The log holds every event exactly once, and each stream's events in version order.
    log = await whole_log(store, page=97)
    keys = [(e.event.stream_id, e.event.version, e.event.event_id) for e in log]
    assert len(keys) == total
    assert Counter(keys) == Counter(
        (e.stream_id, e.version, e.event_id) for a in accounts for e in read[a].events
    )
    committed = Counter(e.event_id for r in done for e in r.events)
    assert all(count == 1 for count in committed.values())
    logged = Counter(e.event.event_id for e in log)
    assert all(logged[event_id] == 1 for event_id in committed)
    for account in accounts:
        versions = [e.event.version for e in log if e.event.stream_id == account]
        assert versions == sorted(versions)


# --- a stream that is only read -----------------------------------------------------


async def test_a_change_to_a_read_only_stream_forces_a_retry(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = plain_store(redis, prefix)
    await open_accounts(plain, ann=10, gus=100)

    async def guarantor_moves() -> None:
        await Executor(plain).execute(Deposit(account=StreamId("gus"), amount=5))

    args, kw = store_args(redis, prefix)
    store = InterleavingStore(*args, before=guarantor_moves, **kw)
    handled = spy(monkeypatch, Withdraw)
    command = Withdraw(account=StreamId("ann"), amount=50, guarantor=StreamId("gus"))
    result = await Executor(store, retry=NO_WAIT).execute(command)

    assert result.attempts == 2
    assert len(handled) == 2
    assert result.versions == {"ann": 3, "gus": 3}
    assert [e.stream_id for e in result.events] == ["ann"]
    gus = (await plain.read("gus")).events
    assert [e.data for e in gus] == [Opened("gus"), Deposited(100), Deposited(5)]
    assert await balances(plain, "ann", "gus") == {"ann": -40, "gus": 105}


async def test_a_read_only_stream_that_drains_makes_the_retry_refuse(
    redis: Redis, prefix: str
) -> None:
    plain = plain_store(redis, prefix)
    await open_accounts(plain, ann=10, gus=100, zed=0)

    async def guarantor_spends() -> None:
        await Executor(plain).execute(transfer("gus", "zed", 90))

    args, kw = store_args(redis, prefix)
    store = InterleavingStore(*args, before=guarantor_spends, **kw)
    command = Withdraw(account=StreamId("ann"), amount=50, guarantor=StreamId("gus"))
    ann_before = await snapshot(redis, [plain.keyspace.stream("ann")])
    with pytest.raises(InsufficientFunds):
        await Executor(store, retry=NO_WAIT).execute(command)
    assert await snapshot(redis, [plain.keyspace.stream("ann")]) == ann_before


# --- streams discovered from the state ----------------------------------------------


async def test_discovered_stream_is_read_folded_and_written(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = plain_store(redis, prefix)
    executor = Executor(store)
    await executor.execute(OpenAccount(account=StreamId("fees"), owner="bank", initial=7))
    await executor.execute(
        OpenAccount(account=StreamId("ann"), owner="ann", initial=50, fee_account="fees")
    )
    seen: list[Ledger] = []
    original = ChargeFee.handle

    def handle(self: ChargeFee, state: Ledger) -> Writes:
        seen.append({k: v.balance for k, v in state.items()})  # type: ignore[misc]
        return original(self, state)

    monkeypatch.setattr(ChargeFee, "handle", handle)
    result = await executor.execute(ChargeFee(account=StreamId("ann"), fee=3))
    assert seen == [{"ann": 50, "fees": 7}], "the discovered stream was folded in"
    assert result.attempts == 1
    assert result.versions == {"ann": 3, "fees": 3}
    assert [(e.stream_id, e.version, e.data) for e in result.events] == [
        ("ann", 3, Withdrawn(3)),
        ("fees", 3, Deposited(3)),
    ]
    assert await balances(store, "ann", "fees") == {"ann": 47, "fees": 10}


async def test_a_change_to_a_discovered_stream_forces_a_retry(
    redis: Redis, prefix: str
) -> None:
    plain = plain_store(redis, prefix)
    executor = Executor(plain)
    await executor.execute(OpenAccount(account=StreamId("fees"), owner="bank"))
    await executor.execute(
        OpenAccount(account=StreamId("ann"), owner="ann", initial=50, fee_account="fees")
    )

    async def fee_account_moves() -> None:
        await plain.append("fees", [Deposited(1)], expected=1)

    args, kw = store_args(redis, prefix)
    store = InterleavingStore(*args, before=fee_account_moves, **kw)
    result = await Executor(store, retry=NO_WAIT).execute(ChargeFee(account=StreamId("ann"), fee=3))
    assert result.attempts == 2
    assert result.versions == {"ann": 3, "fees": 3}
    fees = (await plain.read("fees")).events
    assert [(e.version, e.data) for e in fees] == [
        (1, Opened("bank")),
        (2, Deposited(1)),
        (3, Deposited(3)),
    ]


class Chain(BankCommand, frozen=True, kw_only=True):
    """Reads `start`, then discovers link-1, link-2, ... up to `links` streams."""

    start: StreamId
    links: int

    def more_streams(self, state: Ledger) -> list[str]:
        # Every stream read so far has an entry in the ledger (each holds an event), so
        # this asks for one link more per round until it has all `links` of them.
        known = len(state) - 1
        return [f"link-{i}" for i in range(1, min(known + 1, self.links) + 1)]

    def handle(self, state: Ledger) -> Writes:
        return {self.start: [Deposited(len(state))]}


async def _chain_setup(store: EventStore, links: int) -> None:
    await store.append("start", [Opened("s")])
    for i in range(1, links + 1):
        await store.append(f"link-{i}", [Opened(str(i))])


async def test_endless_discovery_is_refused_and_writes_nothing(
    redis: Redis, prefix: str
) -> None:
    store = plain_store(redis, prefix)
    await _chain_setup(store, 40)
    before = await keys_under(redis, prefix)
    log_length = await redis.xlen(store.keyspace.log(0))
    with pytest.raises(ValidationError, match="kept asking for new streams"):
        await Executor(store).execute(Chain(start=StreamId("start"), links=40))
    assert await keys_under(redis, prefix) == before
    assert await redis.xlen(store.keyspace.log(0)) == log_length


@pytest.mark.parametrize("links", [1, 5, MAX_RESOLVE_ROUNDS - 2])
async def test_a_discovery_chain_resolves(redis: Redis, prefix: str, links: int) -> None:
    store = plain_store(redis, prefix)
    await _chain_setup(store, links)
    result = await Executor(store).execute(Chain(start=StreamId("start"), links=links))
    assert set(result.versions) == {"start", *(f"link-{i}" for i in range(1, links + 1))}
    assert [e.data for e in result.events] == [Deposited(links + 1)]


async def test_discovery_chain_at_the_round_limit_resolves(redis: Redis, prefix: str) -> None:
    store = plain_store(redis, prefix)
    links = MAX_RESOLVE_ROUNDS - 1
    await _chain_setup(store, links)
    result = await Executor(store).execute(Chain(start=StreamId("start"), links=links))
    assert len(result.versions) == links + 1


# --- domain errors and giving up ----------------------------------------------------


async def test_domain_errors_are_not_retried_and_write_nothing(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = plain_store(redis, prefix)
    await open_accounts(store, ann=10, bob=0)
    handled = spy(monkeypatch, Transfer)
    keys = [store.keyspace.log(0), store.keyspace.stream("ann"), store.keyspace.stream("bob")]
    before = await snapshot(redis, keys)
    with pytest.raises(InsufficientFunds, match="ann has 10, cannot send 11"):
        await Executor(store, retry=NO_WAIT).execute(transfer("ann", "bob", 11))
    assert len(handled) == 1
    with pytest.raises(DomainError, match="not open"):
        await Executor(store, retry=NO_WAIT).execute(transfer("ann", "nobody", 1))
    assert len(handled) == 2
    assert await snapshot(redis, keys) == before
    assert await redis.exists(store.keyspace.stream("nobody")) == 0


async def test_retries_exhausted_when_every_commit_conflicts(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = plain_store(redis, prefix)
    await open_accounts(plain, ann=100, bob=0)

    async def always_interfere() -> None:
        await plain.append("bob", [Deposited(1)])

    args, kw = store_args(redis, prefix)
    store = InterleavingStore(*args, before=always_interfere, times=10**6, **kw)
    handled = spy(monkeypatch, Transfer)
    with pytest.raises(RetriesExhausted) as caught:
        await Executor(store, retry=FixedDelay(interval=0, max_retries=2)).execute(
            transfer("ann", "bob", 5)
        )
    assert caught.value.attempts == 3
    assert isinstance(caught.value.last, ConcurrencyConflict)
    assert caught.value.last.stream_id == "bob"
    assert isinstance(caught.value.__cause__, ConcurrencyConflict)
    assert "gave up after 3 attempts" in str(caught.value)
    assert len(handled) == 3
    assert store.commits == 3
    # Only the interfering deposits were written: nothing of the transfer.
    assert await balances(plain, "ann", "bob") == {"ann": 100, "bob": 3}
    assert await stream_lengths(redis, plain, "ann", "bob") == {"ann": 2, "bob": 4}
    assert await redis.xlen(plain.keyspace.log(0)) == 3 + 3


async def test_max_retries_zero_gives_up_after_the_first_conflict(
    redis: Redis, prefix: str
) -> None:
    plain = plain_store(redis, prefix)
    await open_accounts(plain, ann=100, bob=0)
    args, kw = store_args(redis, prefix)
    store = InterleavingStore(
        *args, before=lambda: plain.append("ann", [Deposited(1)]), times=1, **kw
    )
    with pytest.raises(RetriesExhausted) as caught:
        await Executor(store, retry=FixedDelay(max_retries=0)).execute(transfer("ann", "bob", 5))
    assert caught.value.attempts == 1
    assert caught.value.last.stream_id == "ann"


async def test_retry_delays_follow_the_policy_and_rng(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = plain_store(redis, prefix)
    await open_accounts(plain, ann=100, bob=0)
    args, kw = store_args(redis, prefix)
    store = InterleavingStore(
        *args, before=lambda: plain.append("bob", [Deposited(1)]), times=3, **kw
    )
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(rsaga.executor.anyio, "sleep", fake_sleep)
    policy = ExponentialBackoff(base=0.1, cap=0.3, max_retries=5, jitter=0.5)
    result = await Executor(store, retry=policy, rng=random.Random(42)).execute(
        transfer("ann", "bob", 5)
    )
    assert result.attempts == 4
    replay = random.Random(42)
    assert slept == [policy.delay(n, replay) for n in (1, 2, 3)]
    assert slept != [0.1, 0.2, 0.3], "jitter was applied"


# --- what a command may write -------------------------------------------------------


class Rogue(BankCommand, frozen=True, kw_only=True):
    account: StreamId

    def handle(self, state: Ledger) -> Writes:
        return {self.account: [Deposited(1)], "elsewhere": [Deposited(1)]}


async def test_writing_to_an_undeclared_stream_is_refused(redis: Redis, prefix: str) -> None:
    store = plain_store(redis, prefix)
    await open_accounts(store, ann=1)
    before = await keys_under(redis, prefix)
    snap = await snapshot(redis, [k.decode() for k in before])
    with pytest.raises(UndeclaredStream, match="'elsewhere'"):
        await Executor(store).execute(Rogue(account=StreamId("ann")))
    assert await keys_under(redis, prefix) == before
    assert await snapshot(redis, [k.decode() for k in before]) == snap


class Nothing(BankCommand, frozen=True, kw_only=True):
    account: StreamId
    shape: str

    def handle(self, state: Ledger) -> Writes:
        return {} if self.shape == "empty" else {self.account: []}


@pytest.mark.parametrize("shape", ["empty", "no-events"])
async def test_a_command_that_decides_nothing_writes_nothing(
    redis: Redis, prefix: str, shape: str
) -> None:
    store = plain_store(redis, prefix)
    await open_accounts(store, ann=5)
    log_length = await redis.xlen(store.keyspace.log(0))
    result = await Executor(store).execute(Nothing(account=StreamId("ann"), shape=shape))
    assert (result.versions, result.events, result.attempts) == ({"ann": 2}, [], 1)
    assert await redis.xlen(store.keyspace.log(0)) == log_length


@pytest.mark.parametrize("bad", ["", "a b", "x" * 201, "a{1}"])
async def test_a_bad_stream_id_in_a_command_is_refused(
    redis: Redis, prefix: str, bad: str
) -> None:
    store = plain_store(redis, prefix)
    with pytest.raises(InvalidStreamId):
        await Executor(store).execute(OpenAccount(account=StreamId(bad), owner="x"))
    with pytest.raises(InvalidStreamId):
        await Executor(store).execute(transfer("fine", bad, 1))
    assert await keys_under(redis, prefix) == []


async def test_a_cross_shard_command_is_refused(redis: Redis, prefix: str) -> None:
    store = plain_store(redis, prefix, shards=4)
    await store.append("a", [Opened("a"), Deposited(10)])
    await store.append("b", [Opened("b")])
    before = await keys_under(redis, prefix)
    log = store.keyspace.log
    lengths = [await redis.xlen(log(s)) for s in range(4)]
    with pytest.raises(CrossShardWrite):
        await Executor(store).execute(transfer("a", "b", 1))
    assert await keys_under(redis, prefix) == before
    assert [await redis.xlen(log(s)) for s in range(4)] == lengths


async def test_execute_refuses_what_is_not_a_command(redis: Redis, prefix: str) -> None:
    with pytest.raises(ValidationError, match="expected a Command, got Deposited"):
        await Executor(plain_store(redis, prefix)).execute(Deposited(1))  # type: ignore[arg-type]


# --- correlation and causation ------------------------------------------------------


async def test_execute_propagates_correlation_and_causation(redis: Redis, prefix: str) -> None:
    store = plain_store(redis, prefix)
    await open_accounts(store, ann=10, bob=0)
    result = await Executor(store).execute(
        transfer("ann", "bob", 4), correlation_id="order-9", causation_id="evt-3"
    )
    assert [(e.correlation_id, e.causation_id) for e in result.events] == [("order-9", "evt-3")] * 2
    read = await store.read_streams(["ann", "bob"])
    stored = [read["ann"].events[-1], read["bob"].events[-1]]
    assert stored == result.events
    logged = [e.event for e in (await store.read_log(0))[-2:]]
    assert [(e.correlation_id, e.causation_id) for e in logged] == [("order-9", "evt-3")] * 2


async def test_default_correlation_is_fresh_per_command_and_shared_by_its_events(
    redis: Redis, prefix: str
) -> None:
    plain = plain_store(redis, prefix)
    await open_accounts(plain, ann=10, bob=0)
    args, kw = store_args(redis, prefix)
    store = InterleavingStore(
        *args, before=lambda: plain.append("bob", [Deposited(1)]), times=1, **kw
    )
    executor = Executor(store, retry=NO_WAIT)
    first = await executor.execute(transfer("ann", "bob", 1))
    second = await executor.execute(transfer("ann", "bob", 1))
    assert first.attempts == 2
    for result in (first, second):
        [correlation] = {e.correlation_id for e in result.events}
        assert len(correlation) == 32
        assert all(e.causation_id is None for e in result.events)
    assert first.events[0].correlation_id != second.events[0].correlation_id
    read = await plain.read("bob")
    assert read.events[-2:] == [first.events[1], second.events[1]]


async def test_an_idempotency_key_applies_a_command_once(redis: Redis, prefix: str) -> None:
    store = EventStore(redis, EventRegistry(BANK_EVENTS), keyspace=Keyspace(prefix=prefix))
    executor = Executor(store)
    await executor.execute(OpenAccount(account=StreamId("k-1"), owner="k"))
    deposit = Deposit(account=StreamId("k-1"), amount=5)
    first = await executor.execute(deposit, idempotency_key="op-1")
    again = await executor.execute(deposit, idempotency_key="op-1")
    other = await executor.execute(deposit, idempotency_key="op-2")
    assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
    assert again.events == []
    events = (await store.read("k-1")).events
    assert [e.command_id for e in events] == [None, "op-1", "op-2"]
