"""Shared fixtures: every store-level test runs on fakeredis and on a real redis-server."""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from rsaga.testing import RedisServer, fake_redis, require_real_redis


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


@pytest.fixture(params=["fakeredis", "redis"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """An async client on fakeredis or on a real server (the test runs on both)."""
    if request.param == "fakeredis":
        client = fake_redis()
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
