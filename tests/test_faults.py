"""Fault injection (issue 11): real workers and schedulers, private Redis servers, faults.

Each test ends with `Workload.check_invariants`: every input event has exactly
one effect, in per-stream version order; every alarm process rang once and
completed; nothing is pending; no dead letters but the planted ones; no
timeouts left. Workloads are sized for a 2-core machine.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from fault_kit import (
    DroppingProxy,
    RsagaProcess,
    Workload,
    connect,
    make_store,
    outputs,
    percentile,
    wait_for,
)
from redis.asyncio import Redis

from rsaga.testing import RedisServer

pytestmark = pytest.mark.slow

CLAIM_TIMEOUT_MS = 1000


@pytest.fixture
def processes() -> Iterator[list[RsagaProcess]]:
    started: list[RsagaProcess] = []
    yield started
    for process in started:
        process.kill()


async def drain_seconds(workload: Workload, streams: list[str], per_stream: int) -> float:
    """Append `per_stream` Pings to each stream at once; seconds until all are handled."""
    started = time.monotonic()
    await workload.ping(streams, per_stream)
    await wait_for(workload.all_handled, 120, "the burst to drain")
    return time.monotonic() - started


async def test_kill_loop(
    redis_server: RedisServer, prefix: str, tmp_path: Path, processes: list[RsagaProcess]
) -> None:
    """SIGKILL a worker every 2 s (and a scheduler twice) through a backlog; then drain.

    Two schedulers run, as they should where timers matter: a lone scheduler's
    timers wait for its restart (seconds on a loaded machine). Each victim is
    one of the workers not killed last, so entries held by a worker that dies
    are often taken over by the next one to die.
    """
    redis = connect(redis_server.url)
    workload = Workload(make_store(redis, prefix))
    workers = [
        RsagaProcess(redis_server.url, prefix, tmp_path, TEST_HANDLER_JITTER="0.02")
        for _ in range(3)
    ]
    schedulers = [RsagaProcess(redis_server.url, prefix, tmp_path, "scheduler") for _ in range(2)]
    processes += [*workers, *schedulers]
    await workload.ping(["warm-up"])
    await wait_for(workload.all_handled, 60, "the workers to start", lambda: outputs(processes))
    await every_one_started(workers, processes)

    base_burst = 4000
    base_rate = base_burst / await drain_seconds(workload, [f"base-{n}" for n in range(200)], 20)

    kills, period = 10, 2.0
    start_ms = int(time.time() * 1000)
    await workload.set_alarms([f"a{n}" for n in range(200)], lambda n: start_ms + 1000 + n * 100)
    await workload.ping([f"k-{n}" for n in range(200)], 30)  # a backlog through every kill
    rng = random.Random(11)
    victim = workers[0]
    for kill in range(kills):
        await anyio.sleep(period)
        victim = rng.choice([w for w in workers if w is not victim])
        victim.kill()
        victim.start()
        if kill in (3, 7):
            schedulers[0].kill()
            schedulers[0].start()
    drain_burst = 8000
    backlog = sum(workload.pings.values()) - await workload.handled() + drain_burst
    drain_rate = backlog / await drain_seconds(workload, [f"drain-{n}" for n in range(200)], 40)
    await wait_for(workload.all_rang, 60, "every alarm to ring", lambda: outputs(processes))
    await wait_for(lambda: workload.settled(redis), 30, "every group to settle")
    late = await workload.lateness_ms()
    print(
        f"\nkill loop: no-kill rate {base_rate:.0f}/s; after the last kill {backlog} entries "
        f"drained at {drain_rate:.0f}/s ({drain_rate / base_rate:.2f}); timer lateness "
        f"p50 {percentile(late, 0.5)} ms, p99 {percentile(late, 0.99)} ms, max {late[-1]} ms"
    )
    await workload.check_invariants(redis)
    assert all(w.alive for w in workers), outputs(workers)
    assert percentile(late, 0.99) <= CLAIM_TIMEOUT_MS + 2000
    # The target is 0.8 (measured: 0.49-0.88 on the 2-core machine, lowest
    # against a baseline of short streams: each worker process is CPU-bound, and
    # the victim of the last kill spends a core restarting); the floor still
    # fails the take-over that piled a dead worker's backlog on one worker
    # (0.09-0.38).
    assert drain_rate >= 0.4 * base_rate
    await redis.aclose()


async def every_one_started(workers: list[RsagaProcess], processes: list[RsagaProcess]) -> None:
    """Wait until every worker has started (one handling the warm-up says nothing of the
    others, and a test freezing Redis then catches a late one still connecting)."""

    async def started() -> bool:
        return all(" starting: handlers " in w.output for w in workers)

    await wait_for(started, 60, "every worker to start", lambda: outputs(processes))


async def start_cluster(
    url: str,
    workload: Workload,
    tmp: Path,
    processes: list[RsagaProcess],
    alarms: list[str],
    **env: str,
) -> list[RsagaProcess]:
    """Two workers and a scheduler on `url`, and `alarms` due from 1 s on, 50 ms apart."""
    prefix = workload.store.keyspace.prefix
    workers = [RsagaProcess(url, prefix, tmp, **env) for _ in range(2)]
    processes += [*workers, RsagaProcess(url, prefix, tmp, "scheduler", **env)]
    await workload.ping(["warm-up"])
    await wait_for(workload.all_handled, 60, "the workers to start", lambda: outputs(processes))
    await every_one_started(workers, processes)
    now_ms = int(time.time() * 1000)
    await workload.set_alarms(alarms, lambda n: now_ms + 1000 + n * 50)
    return workers


async def finish(
    workload: Workload, redis: Redis, processes: list[RsagaProcess], planted: int = 0
) -> None:
    """Wait for everything to be handled, then check every invariant and that all still run."""
    await workload.reconcile()
    await wait_for(workload.all_handled, 90, "every Ping", lambda: outputs(processes))
    await wait_for(workload.all_rang, 60, "every alarm", lambda: outputs(processes))
    await wait_for(lambda: workload.settled(redis), 30, "every group to settle")
    await workload.check_invariants(redis, planted)
    assert all(p.alive for p in processes), outputs(processes)


async def test_redis_crash_with_append_only_file(
    prefix: str, tmp_path: Path, processes: list[RsagaProcess]
) -> None:
    """SIGKILL Redis mid-run and restart it on its data: workers recover by themselves."""
    if not RedisServer.available():
        pytest.skip("redis-server is not on PATH")
    with RedisServer(append_only=True) as server:
        redis = connect(server.url)
        workload = Workload(make_store(redis, prefix))
        await start_cluster(
            server.url, workload, tmp_path, processes, [f"c{n}" for n in range(60)]
        )
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(workload.keep_pinging, [f"c-{n}" for n in range(100)], stop, 0.2)
            await anyio.sleep(2)
            acknowledged = dict(workload.pings)
            server.kill()
            await anyio.sleep(1)
            server.start()
            restarted = time.monotonic()
            await wait_for(lambda: _pinged_since(workload, acknowledged), 30, "a Ping after")
            stop.set()
        marker = Workload(workload.store)
        await marker.ping(["after-the-crash"])
        await wait_for(marker.all_handled, 60, "a worker to recover", lambda: outputs(processes))
        print(f"\nredis crash: workers handled new events {time.monotonic() - restarted:.1f}s "
              "after Redis restarted")
        await workload.reconcile()
        assert all(workload.pings[s] >= n for s, n in acknowledged.items())
        workload.pings["after-the-crash"] = 1
        await finish(workload, redis, processes)
        await redis.aclose()


async def _pinged_since(workload: Workload, before: dict[str, int]) -> bool:
    return any(workload.pings[s] > n for s, n in before.items())


async def test_redis_frozen_longer_than_the_socket_timeout(
    redis_server: RedisServer, prefix: str, tmp_path: Path, processes: list[RsagaProcess]
) -> None:
    """SIGSTOP Redis past the socket timeout: nothing lost or doubled, no exit, no spinning."""
    redis = connect(redis_server.url)
    workload = Workload(make_store(redis, prefix))
    workers = await start_cluster(
        redis_server.url, workload, tmp_path, processes, [f"f{n}" for n in range(60)],
        RSAGA_REDIS_SOCKET_TIMEOUT="2.5",
    )
    streams = [f"f-{n}" for n in range(100)]
    await workload.ping(streams, 5)  # a backlog the workers are in the middle of
    redis_server.freeze()
    cpu_before = [p.cpu_seconds() for p in processes]
    await anyio.sleep(5)
    cpu_used = [p.cpu_seconds() - c for p, c in zip(processes, cpu_before, strict=True)]
    redis_server.thaw()
    await workload.ping(streams, 2)
    await finish(workload, redis, processes)
    assert all(used < 1.0 for used in cpu_used), f"CPU seconds while frozen: {cpu_used}"
    assert all("redis unavailable" in w.output for w in workers), outputs(workers)
    await redis.aclose()


async def test_connections_dropped_at_random_moments(
    redis_server: RedisServer, prefix: str, tmp_path: Path, processes: list[RsagaProcess]
) -> None:
    """Every connection of the workers and the scheduler is cut within a second."""
    redis = connect(redis_server.url)
    workload = Workload(make_store(redis, prefix))
    with DroppingProxy(redis_server.port, cut_every=1.0) as proxy:
        await start_cluster(proxy.url, workload, tmp_path, processes, [f"d{n}" for n in range(50)])
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(workload.keep_pinging, [f"d-{n}" for n in range(50)], stop, 0.2)
            await anyio.sleep(6)
            stop.set()
        await finish(workload, redis, processes)
        print(f"\ndropped connections: {proxy.cuts} cut")
        assert proxy.cuts >= 20
    await redis.aclose()
