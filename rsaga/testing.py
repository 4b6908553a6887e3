"""Test kit: an event store on in-process fakeredis, a private redis-server, a manual clock.

    store = rsaga.testing.fake_store([Deposited, Withdrawn])
    executor = rsaga.Executor(store)

`RedisServer` starts a throwaway ``redis-server`` on a free loopback port, so
tests can kill and restart it; `real_redis_url` picks one for a test session.
"""

from __future__ import annotations

import os
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

__all__ = ["Driver", "ManualClock", "RedisServer", "fake_redis", "fake_store", "free_port"]


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

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (again) and wait until it answers PING."""
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


def require_real_redis() -> bool:
    """Whether ``RSAGA_REQUIRE_REDIS=1`` asks for real-Redis tests to fail, not skip."""
    return os.environ.get("RSAGA_REQUIRE_REDIS") == "1"
