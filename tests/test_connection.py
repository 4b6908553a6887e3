"""Connections to a real private redis-server: credentials, start-up waits, ACL users."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from rsaga.config import RedisSettings
from rsaga.connection import connect, ping
from rsaga.errors import RedisUnavailable
from rsaga.testing import RedisServer

SLASHY = "Zx9/Qw+7Lk=="


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client of the default (all-powerful) user on the test's private server."""
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def add_user(admin: Redis, name: str, password: str, *rules: str) -> None:
    await admin.execute_command(
        "ACL", "SETUSER", name, "reset", "on", f">{password}", *(rules or ("~*", "+@all"))
    )


async def whoami(client: Redis) -> str:
    name = await client.acl_whoami()
    return name.decode() if isinstance(name, bytes) else str(name)


async def test_a_password_with_unencoded_reserved_characters_authenticates(
    redis_server: RedisServer, admin: Redis
) -> None:
    await add_user(admin, "app", SLASHY)
    client = connect(RedisSettings(url=f"redis://app:{SLASHY}@127.0.0.1:{redis_server.port}/0"))
    try:
        assert (await ping(client, "test")).version.startswith(("6", "7", "8"))
        assert await whoami(client) == "app"
    finally:
        await client.aclose()


async def test_password_setting_keeps_the_secret_out_of_the_url(
    redis_server: RedisServer, admin: Redis
) -> None:
    await add_user(admin, "app", SLASHY)
    client = connect(
        RedisSettings(url=redis_server.url, username="app", password=SLASHY)
    )
    try:
        await ping(client, "test")
        assert await whoami(client) == "app"
    finally:
        await client.aclose()


async def test_password_file_is_read_at_every_new_connection(
    redis_server: RedisServer, admin: Redis, tmp_path: Path
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("first/secret\n", encoding="utf-8")  # as `echo pw > file` writes it
    await add_user(admin, "app", "first/secret")
    client = connect(
        RedisSettings(url=redis_server.url, username="app", password_file=str(secret))
    )
    try:
        await ping(client, "test")
        # Rotate: the server and the file change; the next connection uses the new one.
        await add_user(admin, "app", "second#secret")
        secret.write_text("second#secret", encoding="utf-8")
        await client.connection_pool.disconnect()
        await ping(client, "test")
        assert await whoami(client) == "app"
    finally:
        await client.aclose()


async def test_refused_credentials_fail_at_once_without_the_password(
    redis_server: RedisServer, admin: Redis
) -> None:
    await add_user(admin, "app", "right")
    url = f"redis://app:wr/ong@127.0.0.1:{redis_server.port}/0"
    client = connect(RedisSettings(url=url))
    try:
        with pytest.raises(RedisUnavailable) as caught:
            await ping(client, "redis://app:***@here", wait=30)
    finally:
        await client.aclose()
    message = str(caught.value)
    assert "refused the credentials" in message
    assert "wr/ong" not in message
    assert "\n" not in message
