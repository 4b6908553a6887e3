"""Connections to a real private redis-server: credentials, start-up waits, ACL users."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from worker_plugins import AlarmSet, Ping, Rang, Seen

from rsaga import EventRegistry, EventStore, Keyspace
from rsaga.config import RedisSettings
from rsaga.connection import connect, ping
from rsaga.errors import RedisUnavailable
from rsaga.permissions import minimal_acl
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


def run_rsaga(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run one short ``rsaga`` command to its end."""
    command = Command(tmp, list(args), **env)
    command.process.wait(60)
    return subprocess.CompletedProcess(args, command.process.returncode, command.output, "")


def lua_commands() -> set[str]:
    """Every command rsaga's Lua scripts call, as ACL names (``xgroup|create``)."""
    called = re.compile(r"redis\.p?call\(\s*'([A-Za-z]+)'(?:\s*,\s*'([A-Za-z]+)')?")
    names = set()
    for path in (ROOT / "rsaga" / "lua").rglob("*.lua"):
        for command, first_arg in called.findall(path.read_text(encoding="utf-8")):
            command = command.lower()
            subcommand = command in ("xgroup", "xinfo", "script", "client", "object")
            names.add(f"{command}|{first_arg.lower()}" if subcommand else command)
    return names


def test_the_permission_check_covers_every_command_the_scripts_call() -> None:
    probed = set(minimal_acl("rsaga").split())
    assert lua_commands(), "no Lua commands found: is the pattern stale?"
    assert {f"+{name}" for name in lua_commands()} <= probed


def test_the_readme_documents_the_minimal_acl() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"ACL SETUSER rsaga on >PASSWORD {minimal_acl('rsaga')}" in " ".join(readme.split())


@pytest.fixture
async def acl_env(redis_server: RedisServer, admin: Redis, prefix: str) -> dict[str, str]:
    """The environment of an rsaga process logged in as ``app``, the README's minimal user."""
    await add_user(admin, "app", "app/pw", *minimal_acl(prefix).split())
    url = f"redis://app:app/pw@127.0.0.1:{redis_server.port}/0"
    return {"RSAGA_REDIS_URL": url, "RSAGA_PREFIX": prefix, "TEST_CLAIM_TIMEOUT": "5"}


@pytest.mark.slow
async def test_the_minimal_acl_user_runs_check_worker_scheduler_and_inspection(
    redis_server: RedisServer, admin: Redis, acl_env: dict[str, str], prefix: str,
    tmp_path: Path, commands: list[Command],
) -> None:
    assert await admin.execute_command("ACL", "DRYRUN", "app", "INFO") != b"OK"  # no INFO
    check = run_rsaga(tmp_path, "check", **acl_env)
    assert check.returncode == 0, check.stdout
    assert check.stdout.strip().endswith("ok")
    handlers = {"RSAGA_HANDLERS": "worker_plugins:Recorder,worker_plugins:Alarm"}
    worker = Command(
        tmp_path, ["worker", "--handler", "recorder", "--handler", "alarm"], **acl_env, **handlers
    )
    scheduler = Command(tmp_path, ["scheduler"], **acl_env)
    commands.extend([worker, scheduler])
    store = EventStore(
        admin, EventRegistry([Ping, Seen, AlarmSet, Rang]), keyspace=Keyspace(prefix=prefix)
    )
    due = int(time.time() * 1000) + 1000
    for n in range(5):
        await store.append(f"acl-{n}", [Ping(n=v) for v in range(4)])
        await store.append(f"alarm-set-{n}", [AlarmSet(f"a{n}", due)])

    async def all_done() -> bool:
        seen = await store.read_streams([f"seen-acl-{n}" for n in range(5)])
        bells = await store.read_streams([f"bell-a{n}" for n in range(5)])
        return all(s.version == 4 for s in seen.values()) and all(
            b.version == 1 for b in bells.values()
        )

    deadline = time.monotonic() + 60
    while not await all_done():
        assert time.monotonic() < deadline, worker.output + scheduler.output
        assert worker.process.poll() is None, worker.output
        assert scheduler.process.poll() is None, scheduler.output
        await anyio.sleep(0.1)
    for args in (["health"], ["process", "list"], ["timeouts", "list"], ["dlq", "list"]):
        result = run_rsaga(tmp_path, *args, **acl_env, **handlers)
        assert result.returncode in (0, 1), result.stdout  # 1: a health warning at most
        assert "Traceback" not in result.stdout, (args, result.stdout[-1500:])
    for process in (worker, scheduler):
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(30) == 0, process.output
        assert "Traceback" not in process.output
        assert "NOPERM" not in process.output


async def missing_lines(
    admin: Redis, acl_env: dict[str, str], tmp_path: Path, *rules: str
) -> list[str]:
    """The ``missing`` lines of `rsaga check` once `rules` are applied to the user ``app``."""
    await admin.execute_command("ACL", "SETUSER", "app", *rules)
    result = run_rsaga(tmp_path, "check", **acl_env)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stdout
    grant = f"grant      ACL SETUSER <user> {minimal_acl(acl_env['RSAGA_PREFIX'])}"
    assert grant in result.stdout
    return [line for line in result.stdout.splitlines() if line.startswith("missing")]


async def test_check_lists_each_missing_permission_on_one_line(
    admin: Redis, acl_env: dict[str, str], tmp_path: Path
) -> None:
    assert await missing_lines(admin, acl_env, tmp_path, "-xadd", "-time") == [
        "missing    command TIME: not allowed (grant +time)",
        "missing    command XADD: not allowed (grant +xadd)",
    ]


async def test_check_names_the_keys_a_user_may_not_touch(
    admin: Redis, acl_env: dict[str, str], prefix: str, tmp_path: Path
) -> None:
    missing = await missing_lines(admin, acl_env, tmp_path, "resetkeys", "~elsewhere:*")
    assert missing
    assert all(line.startswith(f"missing    key {prefix}:") for line in missing), missing
    assert all(line.endswith(f"(grant ~{prefix}:*)") for line in missing), missing


@pytest.mark.parametrize("args", [*START_UP, ["health"]], ids=["worker", "scheduler", "health"])
@pytest.mark.parametrize(
    ("rules", "problem"),
    [
        (["-xreadgroup"], "command XREADGROUP: not allowed (grant +xreadgroup)"),
        (["resetkeys", "~elsewhere:*"], "key {prefix}:"),
    ],
    ids=["command", "keys"],
)
async def test_a_user_without_permissions_gets_one_line(
    args: list[str], rules: list[str], problem: str,
    admin: Redis, acl_env: dict[str, str], prefix: str, tmp_path: Path,
) -> None:
    await admin.execute_command("ACL", "SETUSER", "app", *rules)
    result = run_rsaga(tmp_path, *args, **acl_env)
    assert result.returncode == 1, result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("rsaga: the Redis user lacks "), result.stdout
    assert problem.format(prefix=prefix) in last
    assert "Traceback" not in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "f" * 40, 2, b"k1", "k\u00e9", -7, b"\x00\r\n\xff" * 3, ""),
        ("SET", "k", 1.5),  # a float: redis-py packs it
        ("CONFIG GET", "maxmemory"),  # a two-word name: redis-py splits it
        ("SET", b"k", memoryview(b"v")),
        ("SET", b"big", b"x" * 20_000),
    ],
)
def test_fast_packing_sends_what_redis_py_would(args: tuple[object, ...]) -> None:
    from redis.asyncio.connection import Connection, SSLConnection

    from rsaga.connection import packing_fast

    for base in (Connection, SSLConnection):
        fast = packing_fast(base)()
        assert isinstance(fast, base)
        assert b"".join(map(bytes, fast.pack_command(*args))) == b"".join(
            map(bytes, base().pack_command(*args))
        )


async def test_a_connected_client_packs_fast_and_round_trips(redis_server: RedisServer) -> None:
    client = connect(RedisSettings(url=redis_server.url))
    try:
        assert client.connection_pool.connection_class.pack_command is not (
            Redis().connection_pool.connection_class.pack_command
        )
        await client.set("k\u00e9", b"\x00\r\n")
        assert await client.execute_command("GET", "k\u00e9") == b"\x00\r\n"
        assert await client.incrby("n", 41) == 41
    finally:
        await client.aclose()
