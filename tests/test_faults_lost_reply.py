"""A reply lost mid-script (issue 11 finding 11): nothing is re-sent, nothing is stranded."""

from __future__ import annotations

import anyio
import pytest
from fault_kit import DroppingProxy, Workload
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from worker_plugins import Ping, Recorder, Seen

from rsaga import EventRegistry, EventStore, Executor, Keyspace
from rsaga.config import RedisSettings, WorkerSettings
from rsaga.connection import connect
from rsaga.errors import RedisUnavailable
from rsaga.scripts import script
from rsaga.testing import RedisServer
from rsaga.worker import Worker


def store_through(url: str, prefix: str) -> EventStore:
    return EventStore(
        connect(RedisSettings(url=url)),
        EventRegistry([Ping, Seen]),
        keyspace=Keyspace(prefix=prefix),
    )


def test_the_client_never_resends_a_command() -> None:
    retry = connect(RedisSettings(url="redis://127.0.0.1:1/0")).connection_pool.connection_kwargs[
        "retry"
    ]
    assert isinstance(retry, Retry)  # the asyncio class: the synchronous one is ignored
    assert retry._retries == 0


async def test_a_commit_whose_reply_is_lost_is_applied_once(
    redis_server: RedisServer, prefix: str
) -> None:
    direct = Redis.from_url(redis_server.url)
    with DroppingProxy(redis_server.port) as proxy:
        store = store_through(proxy.url, prefix)
        await store.append("warm-up", [Ping()])  # the scripts are loaded now
        proxy.lose_reply_to = b"EVALSHA"
        with pytest.raises((RedisUnavailable, RedisConnectionError)):
            await store.append("once", [Ping()])
        assert proxy.cuts == 1
        assert await direct.xlen(store.keyspace.stream("once")) == 1  # ran, and only once
        await store.append("once", [Ping()])  # the client reconnects for the next call
        assert await direct.xlen(store.keyspace.stream("once")) == 2
        await store.redis.aclose()
    await direct.aclose()


async def test_a_group_read_whose_reply_is_lost_strands_nothing(
    redis_server: RedisServer, prefix: str
) -> None:
    direct = Redis.from_url(redis_server.url)
    writer = Workload(EventStore(direct, EventRegistry([Ping, Seen]), keyspace=Keyspace(prefix)))
    await writer.ping([f"r-{n}" for n in range(4)], 5)
    with DroppingProxy(redis_server.port) as proxy:
        store = store_through(proxy.url, prefix)
        proxy.lose_reply_to = script("read_batch").sha.encode()
        worker = Worker(Executor(store), [Recorder()], settings=WorkerSettings(block_ms=50))
        with anyio.fail_after(30):
            await worker.run_until_idle()
        assert proxy.cuts == 1
        await store.redis.aclose()
    assert await writer.all_handled()
    await direct.aclose()
