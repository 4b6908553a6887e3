"""Lua script loader: include expansion, and EVALSHA with NOSCRIPT recovery."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from rsaga.scripts import Script, ScriptLoadError, all_scripts, expand_includes, script
from rsaga.testing import RedisServer, fake_redis


def reader(files: dict[str, str], calls: list[str] | None = None) -> Callable[[str], str]:
    def read(name: str) -> str:
        if calls is not None:
            calls.append(name)
        return files[name]

    return read


def test_no_includes_is_unchanged() -> None:
    source = "local x = 1\n-- @include is only a directive at the start of a line\nreturn x\n"
    assert expand_includes(source, reader({})) == source


def test_include_is_replaced_by_the_file() -> None:
    out = expand_includes('-- @include "a"\nreturn a()\n', reader({"a": "local function a() end"}))
    assert out == "local function a() end\nreturn a()\n"


def test_nested_includes_expand_once_each() -> None:
    files = {
        "a": '-- @include "c"\nlocal function a() return c() end',
        "b": '-- @include "c"\n--   @include   "a"\nlocal function b() return a() end',
        "c": "local function c() return 1 end",
    }
    calls: list[str] = []
    out = expand_includes('-- @include "a"\n-- @include "b"\nreturn b()\n', reader(files, calls))
    assert out.count("local function c()") == 1
    assert out.count("local function a()") == 1
    assert out.count("local function b()") == 1
    assert out.index("local function c()") < out.index("local function a()")
    assert out.index("local function a()") < out.index("local function b()")
    assert "@include" not in out
    assert "(c already included)" in out
    assert "(a already included)" in out
    assert sorted(calls) == ["a", "b", "c"], "each include is read once"


def test_include_once_is_per_expansion() -> None:
    files = {"a": "A"}
    assert expand_includes('-- @include "a"', reader(files)) == "A"
    assert expand_includes('-- @include "a"', reader(files)) == "A"


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        ({"a": '-- @include "a"'}, "include cycle: a -> a"),
        ({"a": '-- @include "b"', "b": '-- @include "a"'}, "include cycle: a -> b -> a"),
        (
            {"a": '-- @include "b"', "b": '-- @include "c"', "c": '-- @include "b"'},
            "include cycle: a -> b -> c -> b",
        ),
    ],
)
def test_include_cycles_are_errors(files: dict[str, str], cycle: str) -> None:
    with pytest.raises(ScriptLoadError) as caught:
        expand_includes('-- @include "a"\n', reader(files))
    assert str(caught.value) == cycle


def test_a_missing_include_file_is_a_load_error() -> None:
    with pytest.raises(ScriptLoadError, match=r"rsaga/lua/includes/nope\.lua"):
        expand_includes('-- @include "nope"\n')


def test_packaged_scripts_are_expanded() -> None:
    commit = script("commit")
    assert commit is script("commit"), "scripts are cached"
    assert "local function stream_version(key)" in commit.source
    assert '@include "' not in commit.source
    assert commit.sha == hashlib.sha1(commit.source.encode()).hexdigest()
    assert "commit" in [s.name for s in all_scripts()]


@pytest.fixture(params=["fakeredis", "redis"])
async def own_redis(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """A server of this test's own: SCRIPT FLUSH must not disturb other tests."""
    if request.param == "fakeredis":
        client = fake_redis()
        try:
            yield client
        finally:
            await client.aclose()
        return
    if not RedisServer.available():
        pytest.skip("redis-server is not on PATH")
    with RedisServer() as server:
        client = Redis.from_url(server.url)
        try:
            yield client
        finally:
            await client.aclose()


ECHO = Script("echo", "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}")


async def test_script_loads_itself_on_noscript(own_redis: Redis) -> None:
    assert await own_redis.script_exists(ECHO.sha) == [False]
    assert await ECHO(own_redis, ["k"], ["hello"]) == [b"k", b"hello", 1]
    assert await own_redis.script_exists(ECHO.sha) == [True]
    await own_redis.script_flush()
    assert await own_redis.script_exists(ECHO.sha) == [False]
    assert await ECHO(own_redis, ["k"], ["again"]) == [b"k", b"again", 2]
    assert await own_redis.script_exists(ECHO.sha) == [True]
    assert await own_redis.get("k") == b"2", "the script ran exactly once per call"


async def test_load_puts_the_script_in_the_cache(own_redis: Redis) -> None:
    commit = script("commit")
    await own_redis.script_flush()
    await commit.load(own_redis)
    assert await own_redis.script_exists(commit.sha) == [True]


async def test_store_commits_after_a_script_flush(own_redis: Redis) -> None:
    from bank import BANK_EVENTS, Deposited

    from rsaga import EventRegistry, EventStore, Keyspace

    store = EventStore(own_redis, EventRegistry(BANK_EVENTS), keyspace=Keyspace(prefix="flush"))
    await store.append("acct", [Deposited(1)])
    await own_redis.script_flush()
    result = await store.append("acct", [Deposited(2)], expected=1)
    assert result.versions == {"acct": 2}
    assert await own_redis.xlen(store.keyspace.stream("acct")) == 2
    assert await own_redis.xlen(store.keyspace.log(0)) == 2


async def test_ack_batch_acknowledges_only_the_consumers_entries_and_releases_streams(
    redis: Redis, prefix: str
) -> None:
    """One XPENDING over the batch's range decides what is still the consumer's; with more
    of its entries in that range than the XPENDING lists, it asks per id."""
    from rsaga.keyspace import Keyspace
    from rsaga.scripts import Scripts

    keyspace = Keyspace(prefix=prefix)
    scripts = Scripts(redis, keyspace)
    log, group = keyspace.log(0), "g"
    await redis.xgroup_create(log, group, id="0", mkstream=True)
    ids = [(await redis.xadd(log, {"n": str(i)})).decode() for i in range(300)]
    streams = [f"s{i % 3}".encode() for i in range(300)]
    await redis.xreadgroup(group, "a", {log: ">"}, count=300)
    counts, owners = keyspace.in_flight(0, group), keyspace.stream_owners(0, group)
    await redis.hset(counts, mapping={"s0": 100, "s1": 100, "s2": 100})
    await redis.hset(owners, mapping={"s0": "a", "s1": "a", "s2": "a"})
    await redis.xclaim(log, group, "b", 0, [ids[1]])  # taken over: b's now

    batch = [(ids[0], streams[0]), (ids[1], streams[1]), (ids[299], streams[299]),
             (ids[0], streams[0])]
    acknowledged, _, _ = await scripts.ack_batch(log, 0, group, "a", 10, batch)
    assert acknowledged == 2
    assert await redis.hgetall(counts) == {b"s0": b"99", b"s1": b"100", b"s2": b"99"}
    pending = {p["message_id"].decode(): p["consumer"].decode()
               for p in await redis.xpending_range(log, group, "-", "+", 1000)}
    assert ids[0] not in pending
    assert ids[299] not in pending
    assert pending[ids[1]] == "b"
    assert len(pending) == 298

    rest = [(ids[i], streams[i]) for i in range(3, 300, 3)]  # the other 99 of s0
    acknowledged, _, _ = await scripts.ack_batch(log, 0, group, "a", 10, rest)
    assert acknowledged == 99
    assert await redis.hgetall(counts) == {b"s1": b"100", b"s2": b"99"}
    assert await redis.hgetall(owners) == {b"s1": b"a", b"s2": b"a"}
