"""Shared fixtures: every store-level test runs on fakeredis and on a real redis-server."""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from rsaga.cluster import is_cluster
from rsaga.config import RedisSettings
from rsaga.connection import connect
from rsaga.testing import RedisClusterNodes, RedisServer, fake_redis, require_real_redis


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Run every `async def test_...` under anyio (asyncio), without marking each one."""
    if name.startswith("test") and inspect.iscoroutinefunction(obj):
        pytest.mark.anyio(obj)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _no_real_redis(reason: str) -> None:
    if require_real_redis():
        pytest.fail(f"RSAGA_REQUIRE_REDIS=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_redis_url() -> Iterator[str]:
    """RSAGA_TEST_REDIS_URL if set, else a private redis-server for the session."""
    url = os.environ.get("RSAGA_TEST_REDIS_URL")
    if url:
        yield url
        return
    if not RedisServer.available():
        _no_real_redis("no real Redis: set RSAGA_TEST_REDIS_URL or put redis-server on PATH")
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server of this test's own, which the test may stop or kill."""
    if not RedisServer.available():
        _no_real_redis("redis-server is not on PATH")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A private Redis Cluster of 3 masters (no replicas) for the session."""
    if not RedisClusterNodes.available():
        _no_real_redis("redis-server and redis-cli are not on PATH")
    with RedisClusterNodes(masters=3) as cluster:
        yield cluster


CLUSTER_SHARDS = 8
"""The shard count of stores on the cluster backend: shards spread over the masters."""


def cluster_client(url: str) -> Redis:
    """A client of the Redis Cluster at `url`, as `rsaga.connection.connect` builds it."""
    return connect(RedisSettings(url=url, cluster=True))


def shards_for(redis: Redis) -> int:
    """The shard count a suite's store uses on `redis`: 8 on a cluster, else 1."""
    return CLUSTER_SHARDS if is_cluster(redis) else 1


BACKENDS = ["fakeredis", "redis", pytest.param("cluster", marks=pytest.mark.cluster)]
"""The backends of the `redis` fixture; suites that run on a cluster too take it."""


@pytest.fixture(params=BACKENDS)
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """An async client on fakeredis, on a real server, or on a real Redis Cluster of 3
    masters (the test runs on each; a store on the cluster has `CLUSTER_SHARDS` shards,
    see `shards_for`)."""
    if request.param == "fakeredis":
        client = fake_redis()
    elif request.param == "cluster":
        client = cluster_client(request.getfixturevalue("redis_cluster").url)
    else:
        client = Redis.from_url(request.getfixturevalue("real_redis_url"))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests can share one server."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str) -> Path:
    """For CLI tests: an empty working directory (no config file), a clean RSAGA_*
    environment, and this test's prefix."""
    for var in list(os.environ):
        if var.startswith("RSAGA_") and var != "RSAGA_REQUIRE_REDIS":
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSAGA_PREFIX", prefix)
    return tmp_path
