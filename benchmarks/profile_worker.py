"""Profile the worker's hot paths in-process: where the CPU goes, round trips per item.

Usage::

    python benchmarks/profile_worker.py [command|orders|timeouts ...] [--top N] [--count N]

Each workload runs the real `Worker` (through `rsaga.testing.Driver`, so one
process and a manual clock) against a private ``redis-server`` under
``cProfile``, then prints: items handled, wall and CPU time per item, client
round trips per item (each command sent and each pipeline executed), server
commands per item (INFO commandstats delta, scripts' own calls included), and
the top functions by own time and by cumulative time.

- ``command``: the `plugins.CommandHandler` of ``handler_command_p1`` over
  ``--count`` `Ping` events (default 5,000) on 500 streams.
- ``orders``: ``--count`` / 10 orders of ``rsaga_examples.orders`` with the
  process and its three simulated services, as ``process_e2e`` runs them.
- ``timeouts``: ``--count`` `plugins.TimerProbe` processes whose timeouts are
  due at once: the step a worker runs per due timeout (the worker started
  them, so their folds are in its state cache); ``timeouts_cold``: the same
  with the cache emptied first, as for a worker that never saw the processes.

The figures are in-process (no subprocess, no second worker): use them for
shares and counts, and `run.py` for rates.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from plugins import CommandHandler, Ping, Seen, TimerProbe
from redis.asyncio import Redis
from rsaga_examples.orders import (
    WORLD_EVENTS,
    InventoryService,
    OrderFulfilment,
    OrderPlaced,
    PaymentService,
    ShippingService,
)

from rsaga import EventRegistry, EventStore, Keyspace
from rsaga.config import WorkerSettings
from rsaga.connection import packing_fast
from rsaga.testing import Driver, RedisServer

Step = Callable[[], Awaitable[int]]
Workload = Callable[[Redis, int], Awaitable[tuple[Driver, Step]]]
"""Builds a driver and a setup step that returns how many items the driver will handle."""


class Counting(Redis):
    """Counts one round trip per command and per executed pipeline."""

    trips = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        Counting.trips += 1
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        async def counted(raise_on_error: bool = True) -> Any:
            if pipe.command_stack:
                Counting.trips += 1
            return await execute(raise_on_error)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


SETTINGS = WorkerSettings(block_ms=100, shutdown_timeout=5)


async def command(redis: Redis, count: int) -> tuple[Driver, Step]:
    store = EventStore(redis, EventRegistry([Ping, Seen]), keyspace=Keyspace(prefix="pc"))
    driver = Driver(store, [CommandHandler()], settings=SETTINGS)

    async def setup() -> int:
        for i in range(count):
            await store.append(f"s-{i % 500}", [Ping()])
        return count

    return driver, setup


async def orders(redis: Redis, count: int) -> tuple[Driver, Step]:
    store = EventStore(redis, EventRegistry(WORLD_EVENTS), keyspace=Keyspace(prefix="po"))
    services = [PaymentService(), InventoryService(), ShippingService()]
    driver = Driver(store, [OrderFulfilment(), *services], settings=SETTINGS)
    n = max(1, count // 10)

    async def setup() -> int:
        for i in range(n):
            await store.append(f"order-{i}", [OrderPlaced(str(i), 100)])
        return n

    return driver, setup


async def timeouts(redis: Redis, count: int, cold: bool = False) -> tuple[Driver, Step]:
    store = EventStore(redis, EventRegistry(), keyspace=Keyspace(prefix="pt"))
    driver = Driver(store, [TimerProbe()], settings=SETTINGS)

    async def setup() -> int:
        due = driver.clock.now_ms() + 1000
        for i in range(count):
            await driver.processes.start(TimerProbe.name, f"p{i}", due)
        await driver.worker.run_until_idle()
        driver.clock.advance(2)
        if cold and driver.executor.cache is not None:
            driver.executor.cache.clear()  # as in `timeout_capacity`: every step a miss
        return count

    return driver, setup


async def timeouts_cold(redis: Redis, count: int) -> tuple[Driver, Step]:
    return await timeouts(redis, count, cold=True)


WORKLOADS: dict[str, Workload] = {
    "command": command, "orders": orders, "timeouts": timeouts, "timeouts_cold": timeouts_cold,
}


async def commands_run(redis: Redis) -> dict[str, int]:
    """Calls so far per server command (INFO left out)."""
    info: dict[str, Any] = await redis.info("commandstats")
    return {
        k.removeprefix("cmdstat_"): int(v["calls"])
        for k, v in info.items() if k != "cmdstat_info" and isinstance(v, dict)
    }


async def profile(name: str, url: str, count: int, top: int) -> None:
    redis = Counting.from_url(url)
    # As `rsaga.connection.connect` builds it for `rsaga worker`.
    redis.connection_pool.connection_class = packing_fast(redis.connection_pool.connection_class)
    driver, setup = await WORKLOADS[name](redis, count)
    items = await setup()
    profiler = cProfile.Profile()
    before = await commands_run(redis)
    Counting.trips = 0
    wall, cpu = time.perf_counter(), time.process_time()
    profiler.enable()
    await driver.run_until_idle()
    profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = await commands_run(redis)
    per_command = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    server = sum(per_command.values())
    trips = Counting.trips
    print(f"== {name}: {items} items, {wall / items * 1e6:.0f} us wall and "
          f"{cpu / items * 1e6:.0f} us CPU per item (under cProfile), "
          f"{trips / items:.1f} round trips and {server / items:.1f} server commands per item")
    print("server commands per item: " + ", ".join(
        f"{k} {n / items:.2f}" for k, n in sorted(per_command.items(), key=lambda kv: -kv[1])
    ))
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(top)
        print(out.getvalue())
    del driver
    await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with RedisServer() as server:
        for name in args.workloads:
            anyio.run(profile, name, server.url, args.count, args.top)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
