"""Real `rsaga worker` processes against a private redis-server: crashes, signals, outages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from worker_plugins import AlarmSet, Ping, Rang, Seen

from rsaga import EventRegistry, EventStore, Keyspace
from rsaga.deadletters import DeadLetters
from rsaga.processes import (
    FRAMEWORK_EVENTS,
    ProcessCompensated,
    ProcessCompleted,
    ProcessFailed,
    TimeoutFired,
)
from rsaga.testing import RedisServer
from rsaga.worker import timeouts_group

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """One `rsaga worker` (or, with `command`, another rsaga command) subprocess."""

    def __init__(
        self,
        url: str,
        prefix: str,
        tmp: Path,
        handler: str,
        command: list[str] | None = None,
        **env: str,
    ) -> None:
        self.log_path = tmp / f"worker-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        name = {"Recorder": "recorder", "Killer": "killer", "Alarm": "alarm"}.get(handler, "")
        args = command or ["worker", "--concurrency", "32", "--handler", name]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rsaga.cli", *args],
            cwd=ROOT,
            env={
                **os.environ,
                "RSAGA_REDIS_URL": url,
                "RSAGA_PREFIX": prefix,
                **({"RSAGA_HANDLERS": f"worker_plugins:{handler}"} if handler else {}),
                "PYTHONPATH": str(ROOT / "tests"),
                "TEST_CLAIM_TIMEOUT": "1",
                "RSAGA_SHUTDOWN_TIMEOUT": "10",
                **env,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def connect(url: str) -> Redis:
    return Redis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=32))


def make_store(redis: Redis, prefix: str) -> EventStore:
    registry = EventRegistry([Ping, Seen, AlarmSet, Rang, *FRAMEWORK_EVENTS])
    return EventStore(redis, registry, keyspace=Keyspace(prefix=prefix))


async def all_seen(store: EventStore, ids: list[str], per_stream: int) -> bool:
    slices = await store.read_streams([f"seen-{s}" for s in ids])
    return all(s.version == per_stream for s in slices.values())


async def wait_for(condition, timeout: float, what: str, explain=None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            details = await explain() if explain else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details}")
        await anyio.sleep(0.1)


async def explain_group(
    redis: Redis, store: EventStore, ids: list[str], workers: list[WorkerProcess]
) -> str:
    log_key = store.keyspace.log(0)
    slices = await store.read_streams([f"seen-{s}" for s in ids])
    lines = [
        f"groups: {await redis.xinfo_groups(log_key)}",
        f"consumers: {await redis.xinfo_consumers(log_key, 'recorder')}",
        f"owners: {await redis.hgetall(store.keyspace.stream_owners(0, 'recorder'))}",
        f"in flight: {await redis.hgetall(store.keyspace.in_flight(0, 'recorder'))}",
        f"handoffs: {await redis.hgetall(store.keyspace.handoffs(0, 'recorder'))}",
        f"pending: {await redis.xpending_range(log_key, 'recorder', '-', '+', 20)}",
        "behind: " + str([(s.stream_id, s.version) for s in slices.values()][:20]),
    ]
    for worker in workers:
        lines.append(f"--- worker exit={worker.process.poll()}\n{worker.output[-3000:]}")
    return "\n".join(lines)


async def assert_exactly_once(store: EventStore, ids: list[str], per_stream: int) -> None:
    slices = await store.read_streams([f"seen-{s}" for s in ids])
    for stream in slices.values():
        assert [e.data.version for e in stream.events] == list(range(1, per_stream + 1))


async def test_kill_and_terminate_workers_while_10000_events_arrive(
    redis_server: RedisServer, prefix: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    redis = connect(redis_server.url)
    store = make_store(redis, prefix)
    workers += [WorkerProcess(redis_server.url, prefix, tmp_path, "Recorder") for _ in range(3)]
    ids = [f"order-{n}" for n in range(200)]
    per_stream = 50
    for round_ in range(per_stream):
        async with anyio.create_task_group() as tg:
            for stream_id in ids:
                tg.start_soon(store.append, stream_id, [Ping(n=round_)])
        if round_ == 15:
            workers[0].process.send_signal(signal.SIGKILL)
        if round_ == 30:
            workers[1].process.send_signal(signal.SIGTERM)
    await wait_for(
        lambda: all_seen(store, ids, per_stream),
        120,
        "every event to be handled",
        lambda: explain_group(redis, store, ids, workers),
    )
    await assert_exactly_once(store, ids, per_stream)
    assert workers[1].process.wait(30) == 0, workers[1].output
    assert workers[2].process.poll() is None, workers[2].output
    assert await DeadLetters(redis, store.keyspace).count() == 0
    await wait_for(
        lambda: _no_pending(redis, store), 30, "the pending list to drain"
    )
    await redis.aclose()


async def _no_pending(redis: Redis, store: EventStore) -> bool:
    groups = await redis.xinfo_groups(store.keyspace.log(0))
    return all(g["pending"] == 0 for g in groups)


async def test_workers_ride_out_a_redis_outage(
    prefix: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    if not RedisServer.available():
        pytest.skip("redis-server is not on PATH")
    with RedisServer(persist=True) as server:
        redis = connect(server.url)
        store = make_store(redis, prefix)
        workers += [WorkerProcess(server.url, prefix, tmp_path, "Recorder") for _ in range(2)]
        ids = [f"acct-{n}" for n in range(50)]
        for _ in range(5):
            for stream_id in ids:
                await store.append(stream_id, [Ping()])
        await wait_for(lambda: all_seen(store, ids, 5), 60, "the first events")
        await redis.aclose()

        server.stop()
        cpu_before = [w.cpu_seconds() for w in workers]
        await anyio.sleep(3)
        cpu_used = [w.cpu_seconds() - c for w, c in zip(workers, cpu_before, strict=True)]
        server.start()

        redis = connect(server.url)
        store = make_store(redis, prefix)
        for _ in range(5):
            for stream_id in ids:
                await store.append(stream_id, [Ping()])
        await wait_for(lambda: all_seen(store, ids, 10), 60, "events after the outage")
        await assert_exactly_once(store, ids, 10)
        for worker, used in zip(workers, cpu_used, strict=True):
            assert worker.process.poll() is None, worker.output
            assert "redis unavailable" in worker.output
            assert used < 1.0, f"worker spun during the outage: {used:.2f}s CPU in 3s"
        await redis.aclose()


async def test_a_poison_event_that_kills_every_worker_ends_in_dead_letters(
    redis_server: RedisServer, prefix: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    redis = connect(redis_server.url)
    store = make_store(redis, prefix)
    await store.append("a", [Ping(), Ping(payload="poison")])
    await store.append("b", [Ping(), Ping()])
    dead = DeadLetters(redis, store.keyspace)
    deaths = 0
    deadline = time.monotonic() + 90
    while await dead.count() == 0:
        assert time.monotonic() < deadline, "the poison event never reached dead letters"
        if not workers or workers[-1].process.poll() is not None:
            if workers:
                assert workers[-1].process.returncode == 3, workers[-1].output
                deaths += 1
            workers.append(
                WorkerProcess(
                    redis_server.url, prefix, tmp_path, "Killer", TEST_CLAIM_TIMEOUT="0.3"
                )
            )
        await anyio.sleep(0.1)
    [letter] = await dead.list()
    assert (letter.stream_id, letter.version) == ("a", 2)
    assert "without acknowledgement" in letter.error
    assert deaths == 5  # max_deliveries
    await wait_for(lambda: all_seen(store, ["b"], 2), 30, "the healthy stream")
    assert [e.data.version for e in (await store.read("seen-a")).events] == [1]
    await redis.aclose()


async def test_killing_the_scheduler_and_a_worker_mid_timeout_applies_each_timeout_once(
    redis_server: RedisServer, prefix: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    redis = connect(redis_server.url)
    store = make_store(redis, prefix)
    url = redis_server.url

    def worker(**env: str) -> WorkerProcess:
        return WorkerProcess(url, prefix, tmp_path, "Alarm", **env)

    def scheduler() -> WorkerProcess:
        return WorkerProcess(
            url, prefix, tmp_path, "", command=["scheduler", "--batch-size", "5"]
        )

    workers += [worker(TEST_RING_DELAY="0.002"), worker(TEST_RING_DELAY="0.002")]
    alarms = [f"a{n}" for n in range(1500)]
    due = int(time.time() * 1000) + 3000  # every alarm rings at the same moment
    async with anyio.create_task_group() as tg:
        for alarm in alarms:
            tg.start_soon(store.append, f"alarm-set-{alarm}", [AlarmSet(alarm, due)])
    zset = store.keyspace.timeouts(0)

    async def all_scheduled() -> bool:
        return int(await redis.zcard(zset)) == len(alarms)

    await wait_for(all_scheduled, 60, "every alarm to be scheduled")
    workers.append(scheduler())
    await anyio.sleep(max(0.0, due / 1000 - time.time()))
    left_at_kills = []
    while await redis.zcard(zset) and len(left_at_kills) < 5:  # kill it while it drains
        await anyio.sleep(0.02)
        workers[-1].process.kill()
        workers[-1].process.wait(10)
        left_at_kills.append(int(await redis.zcard(zset)))
        workers.append(scheduler())
    workers[0].process.kill()  # and a worker in the middle of applying timeouts
    workers.append(worker())

    async def all_rang() -> bool:
        stats = await redis.hgetall(store.keyspace.process_stats(0, "alarm"))
        return stats.get(b"completed") == str(len(alarms)).encode()

    await wait_for(all_rang, 120, "every alarm to ring")
    assert any(left_at_kills), f"no kill landed mid-drain: {left_at_kills}"
    slices = await store.read_streams([f"bell-{a}" for a in alarms])
    assert all(len(s.events) == 1 for s in slices.values())  # each effect exactly once
    processes = await store.read_streams([f"alarm-{a}" for a in alarms])
    for stream in processes.values():
        fired = [e for e in stream.events if isinstance(e.data, TimeoutFired)]
        assert len(fired) == 1
        assert isinstance(stream.events[-1].data, ProcessCompleted)
    assert await redis.zcard(zset) == 0
    assert await DeadLetters(redis, store.keyspace).count() == 0
    await wait_for(
        lambda: _group_drained(redis, store.keyspace.due_timeouts(0), timeouts_group("alarm")),
        30,
        "the due stream to drain",
    )
    await redis.aclose()


async def _group_drained(redis: Redis, key: str, group: str) -> bool:
    for info in await redis.xinfo_groups(key):
        if info["name"] == group.encode():
            return bool(info["pending"] == 0)
    return False


@pytest.mark.parametrize("kill_after", [3, 6, 9, 12, 15, 18, 21])
async def test_a_saga_ends_the_same_wherever_its_worker_is_killed(
    redis_server: RedisServer, prefix: str, tmp_path: Path, workers: list[WorkerProcess],
    kill_after: int,
) -> None:
    """Hotel and flight book, the car fails: always compensated, each effect once."""
    from rsaga_examples.travel import TRAVEL_EVENTS, TripRequested

    from rsaga.sagas import SAGA_EVENTS, SagaCompensated

    redis = connect(redis_server.url)
    registry = EventRegistry([*TRAVEL_EVENTS, *FRAMEWORK_EVENTS, *SAGA_EVENTS])
    store = EventStore(redis, registry, keyspace=Keyspace(prefix=prefix))
    handlers = ["travel-booking", "hotel-service", "flight-service", "car-service"]

    def worker() -> WorkerProcess:
        args = ["worker"] + [a for h in handlers for a in ("--handler", h)]
        return WorkerProcess(
            redis_server.url, prefix, tmp_path, "", command=args,
            RSAGA_CLAIM_TIMEOUT="1", RSAGA_SERVICE_LATENCY_MS="40",
        )

    saga = "travel-booking-k"
    workers.append(worker())
    await store.append("trip-k", [TripRequested("k", fail_at="car")])

    async def reached() -> bool:
        return await store.version(saga) >= kill_after

    await wait_for(
        reached, 30, f"the saga to write {kill_after} events", lambda: _output(workers)
    )
    workers[-1].process.kill()
    workers.append(worker())

    async def finished() -> bool:
        events = (await store.read(saga)).events
        ended = ProcessFailed | ProcessCompleted | ProcessCompensated
        return bool(events) and isinstance(events[-1].data, ended)

    await wait_for(finished, 30, "the saga to end", lambda: _output(workers))
    events = (await store.read(saga)).events
    assert any(isinstance(e.data, SagaCompensated) for e in events)
    services = {
        s: [e.type.removeprefix("travel.") for e in (await store.read(f"{s}-k")).events]
        for s in ("hotel", "flight", "car")
    }
    booked_then_cancelled = ["BookingRequested", "Booked", "CancellationRequested", "Cancelled"]
    assert services == {
        "hotel": booked_then_cancelled,
        "flight": booked_then_cancelled,
        "car": ["BookingRequested", "BookingFailed"],
    }
    await redis.aclose()


async def _output(workers: list[WorkerProcess]) -> str:
    return "\n".join(f"--- exit={w.process.poll()}\n{w.output[-2000:]}" for w in workers)
