"""Test kit: an event store on in-process fakeredis, a private redis-server, a manual clock.

    store = rsaga.testing.fake_store([Deposited, Withdrawn])
    executor = rsaga.Executor(store)

`RedisServer` starts a throwaway ``redis-server`` on a free loopback port, so
tests can kill and restart it; `real_redis_url` picks one for a test session.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from redis.asyncio import Redis

from rsaga.clock import Clock, ManualClock
from rsaga.config import WorkerSettings
from rsaga.connection import embedded
from rsaga.events import EventRegistry
from rsaga.executor import Executor
from rsaga.handlers import EventHandler
from rsaga.keyspace import Keyspace
from rsaga.process.api import ProcessManager
from rsaga.process.runner import ProcessRunner
from rsaga.runtime.scheduler import Scheduler
from rsaga.runtime.worker import Worker
from rsaga.store import EventStore

__all__ = [
    "Driver",
    "ManualClock",
    "RedisClusterNodes",
    "RedisServer",
    "fake_redis",
    "fake_store",
    "free_port",
]


def fake_redis() -> Redis:
    """A fresh in-process fakeredis server (with Lua) and an async client on it."""
    return embedded()


def fake_store(
    event_types: Iterable[Any] = (),
    *,
    redis: Redis | None = None,
    prefix: str = "rsaga",
    shards: int = 1,
    clock: Clock | None = None,
    **options: Any,
) -> EventStore:
    """An `EventStore` on fakeredis (a fresh one unless `redis` is given)."""
    return EventStore(
        redis or fake_redis(),
        EventRegistry(event_types),
        keyspace=Keyspace(prefix=prefix, shards=shards),
        clock=clock,
        **options,
    )


class Driver:
    """Drives handlers, process managers and the scheduler in-process until nothing is left.

    Time is a `ManualClock` shared by the store, the worker and the scheduler,
    so tests of timeouts, retries and deadlines run in milliseconds:

        driver = Driver(store, [OrderFulfilment()])
        await store.append("order-1", [OrderPlaced("1", 100)])
        await driver.run_until_idle()
        await driver.advance(30)   # the payment wait times out; the retry is scheduled
    """

    def __init__(
        self,
        store: EventStore,
        handlers: Sequence[EventHandler | ProcessManager[Any]],
        *,
        clock: ManualClock | None = None,
        settings: WorkerSettings | None = None,
    ) -> None:
        self.clock = clock or ManualClock()
        store.clock = self.clock
        self.store = store
        self.executor = Executor(store)
        self.worker = Worker(
            self.executor,
            handlers,
            settings=settings or WorkerSettings(block_ms=100, shutdown_timeout=5),
            name="driver",
            clock=self.clock,
        )
        self.scheduler = Scheduler(store.redis, store.keyspace, clock=self.clock)

    @property
    def processes(self) -> ProcessRunner:
        """The process runner, for explicit `start` and `advance` calls."""
        if self.worker.runner is None:
            raise ValueError("no process managers were given to the Driver")
        return self.worker.runner

    async def run_until_idle(self, max_rounds: int = 1000) -> None:
        """Handle everything, fire every timeout due by the clock, until nothing is left."""
        for _ in range(max_rounds):
            await self.worker.run_until_idle()
            moved = 0
            for shard in range(self.store.keyspace.shards):
                moved += await self.scheduler.drain(shard)
            if not moved:
                return
        raise RuntimeError(f"still busy after {max_rounds} rounds (a timeout loop?)")

    async def advance(self, seconds: float) -> None:
        """Move the clock forward and run until idle."""
        self.clock.advance(seconds)
        await self.run_until_idle()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A private ``redis-server`` on a free loopback port, with nothing kept on disk.

    Use as a context manager; `stop` and `start` (same port) simulate an outage,
    `kill` a crash.
    """

    def __init__(
        self,
        port: int | None = None,
        binary: str | None = None,
        *,
        persist: bool = False,
        append_only: bool = False,
    ) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.binary = found
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="rsaga-redis-")
        self._process: subprocess.Popen[bytes] | None = None
        self.persist = persist
        """Save to disk on `stop` and load on `start`, so data outlives a restart."""
        self.append_only = append_only
        """Log every write to an append-only file, fsynced before the reply
        (``appendfsync always``), so data outlives even `kill`."""

    @staticmethod
    def available() -> bool:
        """Whether a ``redis-server`` binary is on PATH."""
        return shutil.which("redis-server") is not None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process and self._process.poll() is None else None

    def start(self, timeout: float = 10.0, extra: Sequence[str] = ()) -> None:
        """Start the server (again) and wait until it answers PING (`extra`: more options)."""
        log = Path(self._dir) / "redis.log"
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "3600 1" if self.persist else "",
                "--appendonly", "yes" if self.append_only else "no",
                "--appendfsync", "always",
                "--dir", self._dir,
                "--logfile", str(log),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM) and wait for it."""
        if self._process and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def freeze(self) -> None:
        """Stop the server's process (SIGSTOP): connections stay open, nothing answers."""
        if self._process and self._process.poll() is None:
            self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen server go on (SIGCONT)."""
        if self._process and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL)."""
        if self._process and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and below 65536 too."""
    for _ in range(100):
        port = random.randrange(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterNodes:
    """A private Redis Cluster on free loopback ports: `masters` masters, each with
    `replicas_per_master` replicas, formed with ``redis-cli --cluster create``.

    Use as a context manager (every node is killed by its PID at the end); `url`
    is one master's, for ``redis.cluster = true``. `kill` crashes one node, for
    failover tests; `wait_ok` waits for ``cluster_state:ok`` on every live node.
    """

    def __init__(self, masters: int = 3, replicas_per_master: int = 0) -> None:
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        self.nodes = [
            RedisServer(_cluster_port()) for _ in range(masters * (1 + replicas_per_master))
        ]
        self.cli = shutil.which("redis-cli")
        if self.cli is None:
            raise FileNotFoundError("redis-cli is not on PATH")

    @staticmethod
    def available() -> bool:
        """Whether ``redis-server`` and ``redis-cli`` are on PATH."""
        return RedisServer.available() and shutil.which("redis-cli") is not None

    @property
    def url(self) -> str:
        """The URL of the first live node."""
        live = next(n for n in self.nodes if n.pid is not None)
        return f"redis://127.0.0.1:{live.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, form the cluster and wait until it serves every slot."""
        for node in self.nodes:
            self._start_node(node)
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        self.redis_cli(
            "--cluster", "create", *addresses,
            "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes",
            timeout=timeout,
        )
        self.wait_ok(timeout)

    @staticmethod
    def _start_node(node: RedisServer) -> None:
        # Fail over within 2 s of a master's death (the default is 15 s); a replica's
        # first sync starts at once (by default a diskless sync waits 5 s for others).
        node.start(extra=[
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(Path(node._dir) / "nodes.conf"),
            "--cluster-node-timeout", "2000",
            "--cluster-replica-validity-factor", "0",
            "--repl-diskless-sync-delay", "0",
        ])

    def restart(self, port: int) -> None:
        """Start a killed node again: it rejoins the cluster it knew (a failed-over master
        comes back as a replica of the one that replaced it)."""
        self._start_node(self.node(port))

    def redis_cli(self, *args: str, port: int | None = None, timeout: float = 30.0) -> str:
        """Run ``redis-cli`` (against `port`, or the first live node); its output."""
        assert self.cli is not None
        target = port or next(n.port for n in self.nodes if n.pid is not None)
        done = subprocess.run(
            [self.cli, "-h", "127.0.0.1", "-p", str(target), *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if done.returncode != 0 or done.stdout.startswith("[ERR]"):
            raise RuntimeError(f"redis-cli {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node says ``cluster_state:ok`` and agrees on the masters,
        and every replica is in sync with its master (``master_link_status:up``)."""
        deadline = time.monotonic() + timeout
        while True:
            live = [n for n in self.nodes if n.pid is not None]
            states = [self.redis_cli("cluster", "info", port=n.port) for n in live]
            links = [self.redis_cli("info", "replication", port=n.port) for n in live]
            synced = all("role:master" in r or "master_link_status:up" in r for r in links)
            if all("cluster_state:ok" in s for s in states) and synced and self._slots_agree():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not reach cluster_state:ok in {timeout}s")
            time.sleep(0.05)

    def _slots_agree(self) -> bool:
        maps = {
            self.redis_cli("cluster", "shards", port=n.port).count("master")
            for n in self.nodes if n.pid is not None
        }
        return len(maps) == 1

    def master_ports(self) -> list[int]:
        """The ports of the live masters, as the cluster sees them now."""
        lines = self.redis_cli("cluster", "nodes").splitlines()
        return sorted(
            int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
            for line in lines
            if "master" in line.split()[2] and "fail" not in line.split()[2]
        )

    def node(self, port: int) -> RedisServer:
        """The node listening on `port`."""
        return next(n for n in self.nodes if n.port == port)

    def kill(self, port: int) -> None:
        """Crash the node on `port` (SIGKILL)."""
        self.node(port).kill()

    def stop(self) -> None:
        """Kill every node by its PID and remove their files."""
        for node in self.nodes:
            node.__exit__(None, None, None)

    def __enter__(self) -> RedisClusterNodes:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def require_real_redis() -> bool:
    """Whether ``RSAGA_REQUIRE_REDIS=1`` asks for real-Redis tests to fail, not skip."""
    return os.environ.get("RSAGA_REQUIRE_REDIS") == "1"
