"""Fault-injection kit: real rsaga processes, a connection-dropping TCP proxy, the invariants.

The workload is `worker_plugins.Recorder` (every `Ping` of stream S appends
`Seen(version)` to ``seen-S`` iff it is the next one there) and
`worker_plugins.Alarm` (a process that rings once at its due time, then
completes), so every invariant of issue 11 can be read back from Redis.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError
from worker_plugins import AlarmSet, Ping, Rang, Seen

from rsaga import EventRegistry, EventStore, Keyspace
from rsaga.deadletters import DeadLetters
from rsaga.processes import FRAMEWORK_EVENTS, ProcessCompleted, TimeoutFired

ROOT = Path(__file__).resolve().parent.parent


class RsagaProcess:
    """One ``rsaga worker`` (Recorder and Alarm) or ``rsaga scheduler`` OS process."""

    def __init__(
        self,
        url: str,
        prefix: str,
        tmp: Path,
        kind: str = "worker",
        *,
        args: tuple[str, ...] = (),
        max_files: int | None = None,
        **env: str,
    ):
        self.url, self.prefix, self.tmp, self.kind, self.env = url, prefix, tmp, kind, env
        self.args, self.max_files = args, max_files
        self.log_path = tmp / f"{kind}-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start the process (again), appending to the same log file."""
        args = ["scheduler"]
        if self.kind == "worker":
            args = ["worker", "--concurrency", "32", "--handler", "recorder", "--handler", "alarm"]
        max_files = self.max_files

        def limit_files() -> None:
            if max_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rsaga.cli", *args, *self.args],
                preexec_fn=limit_files,
                cwd=ROOT,
                env={
                    **os.environ,
                    "RSAGA_REDIS_URL": self.url,
                    "RSAGA_PREFIX": self.prefix,
                    "RSAGA_HANDLERS": "worker_plugins:Recorder,worker_plugins:Alarm",
                    "PYTHONPATH": str(ROOT / "tests"),
                    "RSAGA_CLAIM_TIMEOUT": "1",
                    "RSAGA_SHUTDOWN_TIMEOUT": "5",
                    **self.env,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def cpu_seconds(self) -> float:
        assert self.process is not None
        stat = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def connect(url: str) -> Redis:
    return Redis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=32))


def make_store(redis: Redis, prefix: str) -> EventStore:
    registry = EventRegistry([Ping, Seen, AlarmSet, Rang, *FRAMEWORK_EVENTS])
    return EventStore(redis, registry, keyspace=Keyspace(prefix=prefix))


async def wait_for(
    condition: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    explain: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                                 + (explain() if explain else ""))
        await anyio.sleep(0.25)


def outputs(processes: list[RsagaProcess]) -> str:
    return "\n".join(
        f"--- {p.kind} exit={p.process and p.process.poll()}\n{p.output[-3000:]}" for p in processes
    )


class Workload:
    """Pings over many streams and alarms, appended by the test; what to expect of them."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.pings: dict[str, int] = {}
        """Stream id -> how many Pings the test knows are in it."""
        self.alarms: dict[str, int] = {}
        """Alarm id -> the ms it is due."""

    async def ping(self, stream_ids: list[str], per_stream: int = 1) -> None:
        """Append `per_stream` Pings to each stream, all streams at once."""
        async with anyio.create_task_group() as tg:
            for stream_id in stream_ids:
                tg.start_soon(self._append, stream_id, per_stream)

    async def _append(self, stream_id: str, count: int) -> None:
        result = await self.store.append(stream_id, [Ping() for _ in range(count)])
        self.pings[stream_id] = result.versions[stream_id]

    async def keep_pinging(self, stream_ids: list[str], stop: anyio.Event, pause: float) -> int:
        """Ping every stream each `pause` s until `stop`, riding out Redis errors; failed rounds."""
        failed = 0
        while not stop.is_set():
            try:
                await self.ping(stream_ids)
            except* (RedisError, OSError):
                failed += 1
            with anyio.move_on_after(pause):
                await stop.wait()
        return failed

    async def reconcile(self) -> None:
        """Count the Pings in the streams themselves, after appends whose replies were lost.

        Every append acknowledged to the test must be there: a stream never has
        fewer Pings than the test counted.
        """
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for stream_id in self.pings:
                pipe.xlen(self.store.keyspace.stream(stream_id))
            lengths = await pipe.execute()
        for (stream_id, acknowledged), length in zip(
            list(self.pings.items()), lengths, strict=True
        ):
            assert length >= acknowledged, f"{stream_id}: {acknowledged} acknowledged, {length}"
            self.pings[stream_id] = length

    async def set_alarms(self, ids: list[str], due_ms: Callable[[int], int]) -> None:
        async with anyio.create_task_group() as tg:
            for n, alarm_id in enumerate(ids):
                due = due_ms(n)
                self.alarms[alarm_id] = due
                tg.start_soon(self.store.append, f"alarm-set-{alarm_id}", [AlarmSet(alarm_id, due)])

    async def handled(self) -> int:
        """Pings handled so far (Seen events written), cheaply: one pipelined XLEN each."""
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for stream_id in self.pings:
                pipe.xlen(self.store.keyspace.stream(f"seen-{stream_id}"))
            return sum(await pipe.execute())

    async def all_handled(self) -> bool:
        return await self.handled() == sum(self.pings.values())

    async def all_rang(self) -> bool:
        slices = await self.store.read_streams([f"bell-{a}" for a in self.alarms])
        return all(s.version >= 1 for s in slices.values())

    async def lateness_ms(self) -> list[int]:
        """For each alarm, how late its effect was written (ms after its due time)."""
        slices = await self.store.read_streams([f"bell-{a}" for a in self.alarms])
        late = []
        for alarm_id, due in self.alarms.items():
            rang = slices[f"bell-{alarm_id}"].events[0]
            late.append(int(rang.occurred_at.timestamp() * 1000) - due)
        return sorted(late)

    async def check_invariants(self, redis: Redis, planted_dead_letters: int = 0) -> None:
        """Everything issue 11's suite asks of the end state."""
        store, ks = self.store, self.store.keyspace
        seen = await store.read_streams([f"seen-{s}" for s in self.pings])
        for stream_id, count in self.pings.items():
            versions = [e.data.version for e in seen[f"seen-{stream_id}"].events]
            assert versions == list(range(1, count + 1)), f"{stream_id}: {versions}"
        bells = await store.read_streams([f"bell-{a}" for a in self.alarms])
        processes = await store.read_streams([f"alarm-{a}" for a in self.alarms])
        for alarm_id in self.alarms:
            assert bells[f"bell-{alarm_id}"].version == 1, alarm_id
            events = processes[f"alarm-{alarm_id}"].events
            assert sum(isinstance(e.data, TimeoutFired) for e in events) == 1, alarm_id
            assert isinstance(events[-1].data, ProcessCompleted), alarm_id
        assert await redis.zcard(ks.timeouts(0)) == 0
        assert await redis.hlen(ks.timeout_data(0)) == 0
        for key in (ks.log(0), ks.due_timeouts(0)):
            for group in await redis.xinfo_groups(key):
                assert group["pending"] == 0, (key, group)
        assert await DeadLetters(redis, ks).count() == planted_dead_letters

    async def settled(self, redis: Redis) -> bool:
        """Every group has acknowledged everything (the end state can be checked)."""
        ks = self.store.keyspace
        for key in (ks.log(0), ks.due_timeouts(0)):
            for group in await redis.xinfo_groups(key):
                if group["pending"]:
                    return False
        return True


def percentile(values: list[int], p: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class DroppingProxy:
    """A TCP proxy to Redis that cuts connections, in a thread of its own.

    - `cut_every`: each connection is cut after a random time up to this many
      seconds (mid-request or mid-reply, wherever the data is then);
    - `lose_reply_to`: the first request containing these bytes is forwarded,
      and its connection cut as soon as Redis starts to reply, so the command
      runs but its caller never hears back.
    """

    def __init__(self, target_port: int, *, cut_every: float | None = None) -> None:
        self.target_port = target_port
        self.cut_every = cut_every
        self.lose_reply_to: bytes | None = None
        self.cuts = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> DroppingProxy:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        # Cancel the connections' tasks and close the loop: tasks left pending in a
        # stopped loop are destroyed at some later garbage collection, and asyncio
        # logs that in whatever test runs then (a CLI test counting stderr lines).
        asyncio.run_coroutine_threadsafe(self._cancel_tasks(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @staticmethod
    async def _cancel_tasks() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        losing = asyncio.Event()
        pumps = [
            asyncio.ensure_future(self._pump(client_r, server_w, losing, upstream=True)),
            asyncio.ensure_future(self._pump(server_r, client_w, losing, upstream=False)),
        ]
        lifetime = random.uniform(0.05, self.cut_every) if self.cut_every else None
        done, _ = await asyncio.wait(pumps, timeout=lifetime, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            self.cuts += 1
        for pump in pumps:
            pump.cancel()
        for writer in (client_w, server_w):
            writer.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        losing: asyncio.Event,
        *,
        upstream: bool,
    ) -> None:
        while data := await reader.read(65536):
            if upstream and self.lose_reply_to and self.lose_reply_to in data:
                self.lose_reply_to = None
                losing.set()
            elif not upstream and losing.is_set():
                self.cuts += 1
                return  # Redis ran it and replied; the caller never hears
            writer.write(data)
            await writer.drain()
