"""Connections to a real private redis-server: credentials, start-up waits, ACL users."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from rsaga.config import RedisSettings
from rsaga.connection import connect, ping
from rsaga.errors import RedisUnavailable
from rsaga.testing import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent

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


class Command:
    """One ``rsaga`` OS process, its output (stdout and stderr) kept in a file."""

    def __init__(self, tmp: Path, args: list[str], **env: str) -> None:
        self.log_path = tmp / f"rsaga-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rsaga.cli", *args],
                cwd=tmp,
                env={
                    **{k: v for k, v in os.environ.items() if not k.startswith("RSAGA_")},
                    "PYTHONPATH": str(ROOT / "tests"),
                    "RSAGA_HANDLERS": "worker_plugins:Recorder",
                    **env,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"no {what} within {timeout}s:\n{self.output}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def commands() -> Iterator[list[Command]]:
    started: list[Command] = []
    yield started
    for command in started:
        command.kill()


START_UP = [["worker", "--handler", "recorder"], ["scheduler"]]


@pytest.mark.slow
@pytest.mark.parametrize("args", START_UP, ids=["worker", "scheduler"])
def test_worker_and_scheduler_wait_for_redis_to_come_up(
    args: list[str], tmp_path: Path, commands: list[Command], prefix: str
) -> None:
    if not RedisServer.available():
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    command = Command(tmp_path, args, RSAGA_REDIS_URL=url, RSAGA_PREFIX=prefix)
    commands.append(command)
    command.wait_for(lambda: "waiting for Redis" in command.output, 15, "waiting line")
    time.sleep(1.0)  # still waiting, not exited
    assert command.process.poll() is None, command.output
    with RedisServer(port=port) as server:
        with SyncRedis.from_url(server.url) as client:
            command.wait_for(lambda: bool(client.keys(f"{prefix}:heartbeat:*")), 15, "heartbeat")
        command.process.send_signal(signal.SIGTERM)
        assert command.process.wait(20) == 0, command.output
    assert f"waiting for Redis at {url}" in command.output


@pytest.mark.slow
@pytest.mark.parametrize("args", START_UP, ids=["worker", "scheduler"])
def test_start_up_gives_up_after_connect_timeout_with_one_line(
    args: list[str], tmp_path: Path, commands: list[Command]
) -> None:
    url = f"redis://app:pa/ss@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    command = Command(tmp_path, args, RSAGA_REDIS_URL=url, RSAGA_REDIS_CONNECT_TIMEOUT="1.5")
    commands.append(command)
    assert command.process.wait(30) == 1, command.output
    assert 1.5 <= time.monotonic() - started < 20
    lines = command.output.strip().splitlines()
    assert lines[-1].startswith(
        f"rsaga: cannot reach Redis at redis://app:***@127.0.0.1:{url.rsplit(':', 1)[1]} "
        "(waited 1.5 s): "
    ), command.output
    assert "Traceback" not in command.output
    assert "pa/ss" not in command.output
    assert any("waiting for Redis" in line for line in lines[:-1]), command.output
