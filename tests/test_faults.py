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
    RsagaProcess,
    Workload,
    connect,
    make_store,
    outputs,
    percentile,
    wait_for,
)

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

    burst = 1500
    base_rate = burst / await drain_seconds(workload, [f"base-{n}" for n in range(100)], 15)

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
        if kill < kills - 1:
            victim.start()
        if kill in (3, 7):
            schedulers[0].kill()
            schedulers[0].start()
    # The last victim stays down while the backlog drains: what is measured is
    # the take-over and the spreading, not how long a Python process takes to start.
    backlog = sum(workload.pings.values()) - await workload.handled() + 2 * burst
    drain_rate = backlog / await drain_seconds(workload, [f"drain-{n}" for n in range(200)], 15)
    victim.start()
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
    assert drain_rate >= 0.8 * base_rate
    await redis.aclose()
