"""The event store on fakeredis and on a real redis-server: what ends up in Redis.

Every test here takes the `redis` fixture, so it runs on both backends, and
checks the keys named by the `Keyspace` (XLEN / XRANGE), not only return values.
"""

from __future__ import annotations

import anyio
import msgspec
import pytest
from bank import (
    BANK_EVENTS,
    Deposited,
    Note,
    Opened,
    Withdrawn,
    keys_under,
    raw_entries,
    snapshot,
    whole_log,
)
from conftest import shards_for
from redis.asyncio import Redis

from rsaga import (
    CommitResult,
    ConcurrencyConflict,
    ConfigError,
    CrossShardWrite,
    EventDecodeError,
    EventRegistry,
    EventStore,
    EventTooLarge,
    ExpectedVersion,
    InvalidStreamId,
    Keyspace,
    ManualClock,
    RecordedEvent,
    RedisUnavailable,
    StreamWrite,
    UnknownEventType,
    ValidationError,
)
from rsaga.testing import RedisServer, free_port

# Plain ints, as most callers pass (members are checked in
# test_commit_accepts_expected_version_members).
ANY = int(ExpectedVersion.ANY)
NO_STREAM = int(ExpectedVersion.NO_STREAM)


def make_store(
    redis: Redis, prefix: str, types: tuple[type, ...] = BANK_EVENTS, **options: object
) -> EventStore:
    """A store on `redis`: on a cluster with 8 shards, unless `shards` is given (tests of
    multi-stream commits and of the layout of one shard log use one shard)."""
    shards = options.pop("shards", shards_for(redis))
    return EventStore(
        redis,
        EventRegistry(types),
        keyspace=Keyspace(prefix=prefix, shards=shards),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


def triples(events: list[RecordedEvent]) -> list[tuple[str, int, str]]:
    return [(e.stream_id, e.version, e.event_id) for e in events]


# --- round trip and layout ----------------------------------------------------------


async def test_append_then_read_returns_exactly_what_was_committed(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix)
    result = await store.append("acct-1", [Opened("ann"), Deposited(10), Withdrawn(3)])
    assert result.versions == {"acct-1": 3}
    assert [e.version for e in result.events] == [1, 2, 3]
    assert [e.data for e in result.events] == [Opened("ann"), Deposited(10), Withdrawn(3)]
    assert [e.type for e in result.events] == ["bank.opened", "bank.deposited", "bank.withdrawn"]

    read = await store.read("acct-1")
    assert read.stream_id == "acct-1"
    assert read.version == 3
    assert read.events == result.events, "read-back events equal the committed ones"
    assert await store.version("acct-1") == 3


async def test_stored_layout(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    result = await store.append("acct-1", [Opened("ann"), Deposited(10)])
    ks = Keyspace(prefix=prefix)
    stream = await raw_entries(redis, ks.stream("acct-1"))
    assert [entry_id for entry_id, _ in stream] == [b"1-0", b"2-0"]
    assert all(set(fields) == {b"d"} for _, fields in stream)
    log = await raw_entries(redis, ks.log(0))
    assert [(f[b"s"], f[b"v"]) for _, f in log] == [(b"acct-1", b"1"), (b"acct-1", b"2")]
    assert [f[b"d"] for _, f in log] == [f[b"d"] for _, f in stream], "same envelope in both"
    decoded = store.codec.decode("acct-1", 1, stream[0][1][b"d"])
    assert decoded == result.events[0]
    assert await keys_under(redis, prefix) == sorted(
        [ks.stream("acct-1").encode(), ks.log(0).encode()]
    )


async def test_missing_stream_reads_as_version_zero(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    assert await store.version("nobody") == 0
    read = await store.read("nobody")
    assert (read.version, read.events) == (0, [])
    assert await keys_under(redis, prefix) == [], "reading creates no keys"


async def test_multi_stream_commit(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.append("b", [Opened("bob")])
    await store.append("c", [Opened("cat"), Deposited(1)])
    result = await store.commit(
        [
            StreamWrite("a", NO_STREAM, [Opened("ann"), Deposited(5)]),
            StreamWrite("b", 1, [Deposited(7)]),
            StreamWrite("c", 2),  # checked only
        ]
    )
    assert result.versions == {"a": 2, "b": 2, "c": 2}
    assert triples(result.events) == [
        ("a", 1, result.events[0].event_id),
        ("a", 2, result.events[1].event_id),
        ("b", 2, result.events[2].event_id),
    ]
    ks = store.keyspace
    assert [await redis.xlen(ks.stream(s)) for s in "abc"] == [2, 2, 2]
    assert await redis.xlen(ks.log(0)) == 1 + 2 + 3
    assert (await store.read("b")).events[-1] == result.events[2]


async def test_commit_validates_its_arguments(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    with pytest.raises(ValidationError, match="at least one stream"):
        await store.commit([])
    with pytest.raises(ValidationError, match="same stream twice"):
        await store.commit([StreamWrite("a", ANY, [Deposited(1)]), StreamWrite("a", ANY)])
    with pytest.raises(ValidationError, match="expected version of 'a'"):
        await store.commit([StreamWrite("a", -2, [Deposited(1)])])
    with pytest.raises(ValidationError, match="expected version"):
        await store.commit([StreamWrite("a", "1", [Deposited(1)])])  # type: ignore[arg-type]
    assert await keys_under(redis, prefix) == []


async def test_constructor_refuses_bad_options(redis: Redis, prefix: str) -> None:
    with pytest.raises(ValidationError, match="page_size"):
        make_store(redis, prefix, page_size=0)
    with pytest.raises(ValidationError, match="max_event_bytes"):
        make_store(redis, prefix, max_event_bytes=0)
    decoding = Redis(decode_responses=True)
    try:
        with pytest.raises(ConfigError, match="decode_responses=False"):
            make_store(decoding, prefix)
    finally:
        await decoding.aclose()


async def test_occurred_at_comes_from_the_clock(redis: Redis, prefix: str) -> None:
    clock = ManualClock(start_ms=1_700_000_000_000)
    store = make_store(redis, prefix, clock=clock)
    await store.append("a", [Deposited(1)])
    clock.advance(1.5)
    await store.append("a", [Deposited(2)])
    read = await store.read("a")
    stamps = [int(e.occurred_at.timestamp() * 1000) for e in read.events]
    assert stamps == [1_700_000_000_000, 1_700_000_001_500]


# --- expected versions --------------------------------------------------------------


async def test_expected_exact_version(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    await store.append("a", [Opened("ann"), Deposited(1)])
    result = await store.append("a", [Deposited(2)], expected=2)
    assert result.versions == {"a": 3}
    with pytest.raises(ConcurrencyConflict) as caught:
        await store.append("a", [Deposited(3)], expected=2)
    conflict = caught.value
    assert (conflict.stream_id, conflict.expected, conflict.actual) == ("a", "2", 3)
    assert str(conflict) == "version conflict on stream 'a': expected 2, actual 3"
    assert await redis.xlen(store.keyspace.stream("a")) == 3


async def test_expected_exact_version_of_a_missing_stream(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    with pytest.raises(ConcurrencyConflict) as caught:
        await store.append("a", [Deposited(1)], expected=1)
    assert (caught.value.expected, caught.value.actual) == ("1", 0)
    assert await keys_under(redis, prefix) == []


async def test_expected_no_stream(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    result = await store.append("a", [Opened("ann")], expected=ExpectedVersion.NO_STREAM)
    assert result.versions == {"a": 1}
    with pytest.raises(ConcurrencyConflict) as caught:
        await store.append("a", [Opened("again")], expected=ExpectedVersion.NO_STREAM)
    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (
        "a",
        "no stream",
        1,
    )
    assert "expected no stream, actual 1" in str(caught.value)
    assert [e.data for e in (await store.read("a")).events] == [Opened("ann")]


async def test_expected_any_always_appends(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    for n in range(1, 4):
        result = await store.append("a", [Deposited(n)], expected=ExpectedVersion.ANY)
        assert result.versions == {"a": n}
    assert await redis.xlen(store.keyspace.stream("a")) == 3


@pytest.mark.parametrize("expected", [ExpectedVersion.NO_STREAM, ExpectedVersion.ANY])
async def test_commit_accepts_expected_version_members(
    redis: Redis, prefix: str, expected: ExpectedVersion
) -> None:
    store = make_store(redis, prefix)
    result = await store.commit([StreamWrite("a", expected, [Deposited(1)])])
    assert result.versions == {"a": 1}


async def test_concurrent_appends_at_one_expected_version_admit_one(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    outcomes: list[CommitResult | ConcurrencyConflict] = []

    async def append(n: int) -> None:
        try:
            outcomes.append(await store.append("a", [Deposited(n)], expected=NO_STREAM))
        except ConcurrencyConflict as conflict:
            outcomes.append(conflict)

    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(append, n)
    wins = [o for o in outcomes if isinstance(o, CommitResult)]
    conflicts = [o for o in outcomes if isinstance(o, ConcurrencyConflict)]
    assert len(wins) == 1
    assert len(conflicts) == 9
    assert all(c.actual == 1 for c in conflicts)
    assert await redis.xlen(store.keyspace.stream("a")) == 1
    assert await redis.xlen(store.keyspace.log(0)) == 1
    assert (await store.read("a")).events == wins[0].events


# --- streams that were only read ----------------------------------------------------


async def test_a_read_only_stream_that_changed_is_a_conflict(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.append("a", [Opened("ann")])
    await store.append("rates", [Deposited(1)])
    seen = await store.version("rates")
    await store.append("rates", [Deposited(2)])  # changes after "we" read it
    with pytest.raises(ConcurrencyConflict) as caught:
        await store.commit([StreamWrite("a", 1, [Deposited(5)]), StreamWrite("rates", seen)])
    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (
        "rates",
        "1",
        2,
    )
    assert await redis.xlen(store.keyspace.stream("a")) == 1
    assert await redis.xlen(store.keyspace.log(0)) == 3


async def test_a_read_only_stream_that_did_not_change_is_not_written(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.append("rates", [Deposited(1)])
    result = await store.commit(
        [StreamWrite("a", NO_STREAM, [Opened("ann")]), StreamWrite("rates", 1)]
    )
    assert result.versions == {"a": 1, "rates": 1}
    assert [e.stream_id for e in result.events] == ["a"]
    assert await redis.xlen(store.keyspace.stream("rates")) == 1
    assert await redis.xlen(store.keyspace.log(0)) == 2


async def test_a_check_only_commit_on_a_missing_stream(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    assert (await store.commit([StreamWrite("ghost", NO_STREAM)])).versions == {"ghost": 0}
    with pytest.raises(ConcurrencyConflict):
        await store.commit([StreamWrite("ghost", 1)])
    assert await keys_under(redis, prefix) == []


# --- a conflict writes nothing ------------------------------------------------------


@pytest.mark.parametrize("stale", ["a", "b", "c"])
async def test_a_conflict_writes_nothing_anywhere(redis: Redis, prefix: str, stale: str) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.append("a", [Opened("ann")])
    await store.append("b", [Opened("bob"), Deposited(2)])
    await store.append("c", [Opened("cat"), Deposited(3), Withdrawn(1)])
    versions = {"a": 1, "b": 2, "c": 3}
    versions[stale] -= 1
    ks = store.keyspace
    keys = [ks.log(0), *(ks.stream(s) for s in "abc")]
    before = await snapshot(redis, keys)
    with pytest.raises(ConcurrencyConflict) as caught:
        await store.commit(
            [StreamWrite(s, versions[s], [Deposited(10), Deposited(11)]) for s in "abc"]
        )
    assert caught.value.stream_id == stale
    assert await snapshot(redis, keys) == before
    assert [await redis.xlen(k) for k in keys] == [6, 1, 2, 3]
    assert await keys_under(redis, prefix) == sorted(k.encode() for k in keys)


# --- the shard log ------------------------------------------------------------------


async def test_the_log_holds_every_committed_event_once_in_commit_order(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, (*BANK_EVENTS, Note), shards=1)
    committed: list[RecordedEvent] = []
    committed += (await store.append("a", [Opened("ann"), Deposited(1)])).events
    committed += (await store.append("b", [Opened("bob")], expected=NO_STREAM)).events
    with pytest.raises(ConcurrencyConflict):
        await store.append("a", [Deposited(99)], expected=NO_STREAM)
    result = await store.commit(
        [
            StreamWrite("b", 1, [Deposited(2), Withdrawn(1)]),
            StreamWrite("a", 2, [Withdrawn(1)]),
            StreamWrite("c", NO_STREAM),
        ]
    )
    committed += result.events
    committed += (await store.append("c", [Opened("cat")])).events
    last = await store.commit([StreamWrite("a", 3), StreamWrite("c", 1, [Note("x")])])
    committed += last.events

    log = await store.read_log(0)
    assert triples([entry.event for entry in log]) == triples(committed)
    assert [entry.event for entry in log] == committed
    ids = [entry.log_id for entry in log]
    assert len(set(ids)) == len(ids) == 8
    raw_ids = [entry_id.decode() for entry_id, _ in await raw_entries(redis, store.keyspace.log(0))]
    assert ids == raw_ids


async def test_read_log_pages_with_after_and_count(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    committed = (await store.append("a", [Deposited(n) for n in range(1, 8)])).events
    first = await store.read_log(0, count=3)
    assert [e.event for e in first] == committed[:3]
    rest = await store.read_log(0, after=first[-1].log_id, count=100)
    assert [e.event for e in rest] == committed[3:]
    assert await store.read_log(0, after=rest[-1].log_id) == []
    assert [e.event for e in await whole_log(store, page=2)] == committed


async def test_each_shard_has_its_own_log(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=4)
    ks = store.keyspace
    ids = {s: ks.shard_of(s) for s in ["a", "b", "acct-1", "acct-2"]}
    assert ids == {"a": 3, "b": 1, "acct-1": 1, "acct-2": 3}
    r1 = await store.commit([StreamWrite("b", NO_STREAM, [Opened("b")]), StreamWrite("acct-1", 0)])
    r3 = await store.commit(
        [StreamWrite("a", NO_STREAM, [Opened("a")]), StreamWrite("acct-2", 0, [Opened("2")])]
    )
    assert [e.event for e in await store.read_log(1)] == r1.events
    assert [e.event for e in await store.read_log(3)] == r3.events
    assert await store.read_log(0) == []
    assert await redis.exists(ks.log(0), ks.log(2)) == 0
    assert ks.stream("a").startswith(f"{prefix}:{{3}}:")
    assert await redis.xlen(ks.stream("a")) == 1
    with pytest.raises(ValidationError, match=r"shard must be in 0\.\.3"):
        await store.read_log(4)
    with pytest.raises(ValidationError):
        await store.read_log(-1)


# --- bad input: typed errors, nothing written -----------------------------------------

BAD_STREAM_IDS = ["", "x" * 201, "a{b", "a}b", "a b", "a*", "a\nb"]


@pytest.mark.parametrize("bad", BAD_STREAM_IDS)
async def test_bad_stream_ids_are_refused_before_anything_is_written(
    redis: Redis, prefix: str, bad: str
) -> None:
    store = make_store(redis, prefix)
    with pytest.raises(InvalidStreamId):
        await store.append(bad, [Deposited(1)])
    with pytest.raises(InvalidStreamId):
        await store.commit([StreamWrite("fine", ANY, [Deposited(1)]), StreamWrite(bad, ANY)])
    with pytest.raises(InvalidStreamId):
        await store.read(bad)
    with pytest.raises(InvalidStreamId):
        await store.read_streams(["fine", bad])
    with pytest.raises(InvalidStreamId):
        await store.version(bad)
    assert await keys_under(redis, prefix) == []


async def test_longest_stream_id_is_accepted(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    longest = "x" * 200
    await store.append(longest, [Deposited(1)])
    assert await redis.xlen(store.keyspace.stream(longest)) == 1


async def test_too_large_event_is_refused(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, (Note,))
    with pytest.raises(EventTooLarge, match="the limit is 1048576"):
        await store.append("a", [Note("x" * (1024 * 1024))])
    assert await keys_under(redis, prefix) == []


async def test_event_size_limit_is_configurable_and_inclusive(redis: Redis, prefix: str) -> None:
    clock = ManualClock()
    probe = make_store(redis, prefix, (Note,), clock=clock)
    size = len(
        probe.codec.encode(
            Note("x" * 50),
            event_id="00" * 16,
            occurred_at_ms=clock.now_ms(),
            correlation_id="c" * 32,
            causation_id=None,
        )
    )
    tight = make_store(redis, prefix, (Note,), clock=clock, max_event_bytes=size - 1)
    with pytest.raises(EventTooLarge, match=f"the limit is {size - 1}"):
        await tight.append("a", [Note("x" * 50)], correlation_id="c" * 32)
    assert await keys_under(redis, prefix) == []
    exact = make_store(redis, prefix, (Note,), clock=clock, max_event_bytes=size)
    await exact.append("a", [Note("x" * 50)], correlation_id="c" * 32)
    assert await redis.xlen(exact.keyspace.stream("a")) == 1


async def test_one_bad_event_in_a_multi_stream_commit_writes_nothing(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix, (*BANK_EVENTS, Note), shards=1, max_event_bytes=200)
    with pytest.raises(EventTooLarge):
        await store.commit(
            [
                StreamWrite("a", ANY, [Deposited(1), Deposited(2)]),
                StreamWrite("b", ANY, [Deposited(3), Note("y" * 500)]),
            ]
        )
    with pytest.raises(UnknownEventType):
        await store.commit(
            [StreamWrite("a", ANY, [Deposited(1)]), StreamWrite("b", ANY, [msgspec.Struct()])]
        )
    assert await keys_under(redis, prefix) == []


async def test_unregistered_event_type_is_refused(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)  # Note is not registered
    with pytest.raises(UnknownEventType, match="Note is not registered"):
        await store.append("a", [Opened("ann"), Note("hi")])
    assert await keys_under(redis, prefix) == []


async def test_cross_shard_commit_is_refused(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=4)
    assert store.keyspace.shard_of("a") != store.keyspace.shard_of("b")
    with pytest.raises(CrossShardWrite, match="one shard"):
        await store.commit([StreamWrite("a", ANY, [Deposited(1)]), StreamWrite("b", ANY)])
    assert await keys_under(redis, prefix) == []
    # Same shard is fine ("a" and "acct-2" both live in shard 3).
    await store.commit([StreamWrite("a", ANY, [Deposited(1)]), StreamWrite("acct-2", ANY)])
    assert await redis.xlen(store.keyspace.log(3)) == 1


async def test_unreachable_redis_is_a_clear_error_without_the_password() -> None:
    port = free_port()
    client = Redis.from_url(f"redis://user:secret@127.0.0.1:{port}/0")
    store = EventStore(client, EventRegistry(BANK_EVENTS), keyspace=Keyspace(prefix="gone"))
    try:
        calls = [
            store.append("a", [Deposited(1)]),
            store.commit([StreamWrite("a", ANY, [Deposited(1)])]),
            store.read("a"),
            store.read_streams(["a", "b"]),
            store.version("a"),
            store.read_log(0),
        ]
        for call in calls:
            with pytest.raises(RedisUnavailable) as caught:
                await call
            message = str(caught.value)
            assert f"127.0.0.1:{port}" in message
            assert "secret" not in message
            assert "secret" not in repr(caught.value)
            assert isinstance(caught.value, ConnectionError)
    finally:
        await client.aclose()


async def test_redis_outage_surfaces_as_redis_unavailable_and_recovers(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    store = EventStore(client, EventRegistry(BANK_EVENTS), keyspace=Keyspace(prefix="outage"))
    try:
        await store.append("a", [Deposited(1)])
        redis_server.kill()
        with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{redis_server.port}"):
            await store.append("a", [Deposited(2)])
        redis_server.start()  # empty again: nothing is kept on disk
        result = await store.append("a", [Deposited(3)])
        assert result.versions == {"a": 1}
        assert await client.xlen(store.keyspace.stream("a")) == 1
    finally:
        await client.aclose()


# --- paged reads --------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 9, 10])
async def test_paged_read_is_complete_and_in_order(redis: Redis, prefix: str, n: int) -> None:
    store = make_store(redis, prefix, page_size=3)
    if n:
        await store.append("a", [Deposited(i) for i in range(1, n + 1)])
    read = await store.read("a")
    assert [e.version for e in read.events] == list(range(1, n + 1))
    assert [e.data for e in read.events] == [Deposited(i) for i in range(1, n + 1)]
    assert read.version == n


async def test_paged_read_uses_one_round_trip_per_page(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(redis, prefix, shards=1, page_size=3)
    await store.append("long", [Deposited(i) for i in range(10)])
    await store.append("short", [Deposited(i) for i in range(2)])
    await store.read("short")  # loads the script, so NOSCRIPT retries do not count
    round_trips = 0
    original = redis.execute_command

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal round_trips
        round_trips += args[0] == "EVALSHA"
        return await original(*args, **kwargs)

    monkeypatch.setattr(redis, "execute_command", counting)
    read = await store.read_streams(["long", "short"])
    assert len(read["long"].events) == 10
    assert read["short"].version == 2
    # Pages of 3: 3, 3, 3, 1 -> four round trips for the longest stream, not 4 + 1.
    assert round_trips == 4


async def test_read_streams_reads_several_streams(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, page_size=3)
    lengths = {"empty": 0, "two": 2, "seven": 7, "ten": 10}
    written: dict[str, list[RecordedEvent]] = {}
    for stream_id, n in lengths.items():
        if n:
            written[stream_id] = (
                await store.append(stream_id, [Deposited(i) for i in range(n)])
            ).events
    read = await store.read_streams(["ten", "empty", "two", "seven", "two"])
    assert list(read) == ["ten", "empty", "two", "seven"]
    for stream_id, n in lengths.items():
        assert read[stream_id].version == n
        assert read[stream_id].events == written.get(stream_id, [])
    assert await store.read_streams([]) == {}


@pytest.mark.parametrize("from_version", [1, 2, 4, 10, 11])
async def test_read_from_version(redis: Redis, prefix: str, from_version: int) -> None:
    store = make_store(redis, prefix, page_size=3)
    written = (await store.append("a", [Deposited(i) for i in range(1, 11)])).events
    read = await store.read("a", from_version=from_version)
    assert read.events == written[from_version - 1 :]
    assert read.version == 10
    several = await store.read_streams(["a", "b"], from_version=from_version)
    assert several["a"].events == written[from_version - 1 :]
    assert several["b"].events == []


async def test_read_past_the_end_reports_the_real_version(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    await store.append("a", [Deposited(i) for i in range(10)])
    assert (await store.read("a", from_version=20)).version == 10


async def test_read_from_version_zero_is_refused(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    with pytest.raises(ValidationError, match="from_version"):
        await store.read("a", from_version=0)


# --- decoding what is stored --------------------------------------------------------


def raw_envelope(type_name: str, payload: object) -> bytes:
    """Envelope bytes in the stored format, written by hand."""
    body = msgspec.Raw(msgspec.msgpack.encode(payload))
    return msgspec.msgpack.encode([bytes(16), type_name, 1_700_000_000_000, "corr", None, body])


async def test_unknown_type_name_in_redis_raises_on_read(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix)
    key = store.keyspace.stream("a")
    good = raw_envelope("bank.deposited", {"type": "bank.deposited", "amount": 1})
    await redis.xadd(key, {"d": good}, id="1-0")
    assert (await store.read("a")).events[0].data == Deposited(1), "the raw format is right"
    await redis.xadd(key, {"d": raw_envelope("bank.closed", {})}, id="2-0")
    with pytest.raises(UnknownEventType, match=r"a@2: event type 'bank.closed' is not registered"):
        await store.read("a")


async def test_a_reader_without_the_writers_type_raises_unknown_event_type(
    redis: Redis, prefix: str
) -> None:
    writer = make_store(redis, prefix, (*BANK_EVENTS, Note), shards=1)
    reader = make_store(redis, prefix, shards=1)
    await writer.append("a", [Opened("ann"), Note("memo")])
    assert [e.type for e in (await writer.read("a")).events] == ["bank.opened", "Note"]
    with pytest.raises(UnknownEventType, match="'Note'"):
        await reader.read("a")
    with pytest.raises(UnknownEventType, match="'Note'"):
        await reader.read_log(0)


@pytest.mark.parametrize("blob", [b"garbage", b"\xc1", b"", raw_envelope("bank.deposited", [])])
async def test_garbage_bytes_raise_event_decode_error(
    redis: Redis, prefix: str, blob: bytes
) -> None:
    store = make_store(redis, prefix)
    await redis.xadd(store.keyspace.stream("a"), {"d": blob}, id="1-0")
    await redis.xadd(store.keyspace.log(0), {"s": "a", "v": 1, "d": blob})
    with pytest.raises(EventDecodeError, match="a@1"):
        await store.read("a")
    with pytest.raises(EventDecodeError, match="a@1"):
        await store.read_log(0)


async def test_stream_entry_without_envelope_field_raises_event_decode_error(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix)
    await redis.xadd(store.keyspace.stream("a"), {"x": b"1"}, id="1-0")
    with pytest.raises(EventDecodeError):
        await store.read("a")


@pytest.mark.parametrize(
    "fields",
    [
        {b"v": b"1", b"d": b""},
        {b"s": b"a", b"d": b""},
        {b"s": b"a", b"v": b"1"},
        {b"s": b"a", b"v": b"one", b"d": b""},
        {b"s": b"\xff", b"v": b"1", b"d": b""},
        {},
    ],
)
async def test_decode_log_entry_with_bad_fields(
    redis: Redis, prefix: str, fields: dict[bytes, bytes]
) -> None:
    store = make_store(redis, prefix)
    with pytest.raises(EventDecodeError, match="log entry 5-0 lacks a valid s/v/d field"):
        store.decode_log_entry(b"5-0", fields)


async def test_decode_log_entry_of_a_good_entry(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    result = await store.append("a", [Opened("ann")])
    [(entry_id, fields)] = await raw_entries(redis, store.keyspace.log(0))
    entry = store.decode_log_entry(entry_id, fields)
    assert entry is not None
    assert entry.log_id == entry_id.decode()
    assert entry.event == result.events[0]
    same = store.decode_log_entry(entry_id.decode(), fields, wanted={"bank.opened"})
    assert same == entry


async def test_decode_log_entry_skips_unwanted_types_without_decoding_them(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix)
    unknown = {b"s": b"a", b"v": b"1", b"d": raw_envelope("not.registered", {"x": 1})}
    assert store.decode_log_entry(b"1-0", unknown, wanted={"bank.opened"}) is None
    with pytest.raises(UnknownEventType):
        store.decode_log_entry(b"1-0", unknown)
    with pytest.raises(EventDecodeError):
        store.decode_log_entry(b"1-0", {b"s": b"a", b"v": b"1", b"d": b"junk"}, wanted=())


# --- correlation and causation ------------------------------------------------------


async def test_correlation_and_causation_are_stored(redis: Redis, prefix: str) -> None:
    store = make_store(redis, prefix, shards=1)
    await store.commit(
        [StreamWrite("a", ANY, [Opened("ann")]), StreamWrite("b", ANY, [Opened("bob")])],
        correlation_id="order-77",
        causation_id="cmd-1",
    )
    read = await store.read_streams(["a", "b"])
    for stream_id in "ab":
        [event] = read[stream_id].events
        assert (event.correlation_id, event.causation_id) == ("order-77", "cmd-1")
    for entry in await store.read_log(0):
        assert (entry.event.correlation_id, entry.event.causation_id) == ("order-77", "cmd-1")


async def test_default_correlation_is_fresh_and_shared_by_one_commit(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix)
    first = await store.append("a", [Opened("ann"), Deposited(1)])
    second = await store.append("a", [Deposited(2)])
    stored = (await store.read("a")).events
    assert stored[0].correlation_id == stored[1].correlation_id == first.events[0].correlation_id
    assert stored[2].correlation_id == second.events[0].correlation_id
    assert stored[0].correlation_id != stored[2].correlation_id
    assert all(len(e.correlation_id) == 32 and e.causation_id is None for e in stored)
    assert len({e.event_id for e in stored}) == 3
