"""What one `rsaga health` and one console refresh cost with many processes: round trips,
time, index memory.

Usage::

    python benchmarks/health_cost.py [--processes 100000] [--types 3]

Starts a private ``redis-server`` (`rsaga.testing.RedisServer`), fills the process
indexes through real commits (each starts one process: a `ProcessStarted` event and
its index update, the same script call a process manager's first step makes; sent
64 at a time), then times `health_report` with every per-type check on, counting
its round trips (each command sent alone or each pipeline is one), one
`search_processes` page, and one live refresh of the console's overview and of its
process list (what a browser's poll asks for, through the ASGI app in process).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from rsaga import EventStore, Keyspace
from rsaga.config import HealthSettings
from rsaga.events import EventRegistry
from rsaga.health import Heartbeat, health_report, write_heartbeat
from rsaga.inspect import search_processes
from rsaga.process.index import IndexUpdate
from rsaga.processes import FRAMEWORK_EVENTS, ProcessStarted
from rsaga.store import Effects, StreamWrite
from rsaga.testing import RedisServer


class RoundTrips:
    """Counts round trips of a client: commands sent alone, and pipelines."""

    def __init__(self) -> None:
        self.count = 0
        self._command = Redis.execute_command
        self._pipeline = Pipeline.execute

    def __enter__(self) -> RoundTrips:
        counter = self

        async def command(client: Any, *args: Any, **options: Any) -> Any:
            counter.count += 1
            return await counter._command(client, *args, **options)

        async def pipeline(pipe: Any, *args: Any, **options: Any) -> Any:
            counter.count += 1
            return await counter._pipeline(pipe, *args, **options)

        Redis.execute_command = command  # type: ignore[method-assign]
        Pipeline.execute = pipeline  # type: ignore[method-assign]
        return self

    def __exit__(self, *_: object) -> None:
        Redis.execute_command = self._command  # type: ignore[method-assign]
        Pipeline.execute = self._pipeline  # type: ignore[method-assign]


async def populate(store: EventStore, processes: int, types: list[str]) -> None:
    """Start `processes` processes spread over `types`, 64 commits in flight at a time."""
    send, receive = anyio.create_memory_object_stream[int](max_buffer_size=1000)

    async def commit_all() -> None:
        async with receive.clone() as numbers:
            async for n in numbers:
                process_type = types[n % len(types)]
                stream_id = f"{process_type}-{n}"
                start = ProcessStarted(process_type, str(n), 1, None)
                await store.commit(
                    [StreamWrite(stream_id, 0, [start])],
                    correlation_id=f"order-{n}",
                    effects=Effects(index=[IndexUpdate(
                        process_type, stream_id, "start", starts=True,
                        correlation_id=f"order-{n}", retry_step="charge" if n % 97 == 0
                        else "", retries=3 if n % 97 == 0 else -1,
                    )]),
                )

    async with anyio.create_task_group() as tg:
        for _ in range(64):
            tg.start_soon(commit_all)
        async with send:
            for n in range(processes):
                await send.send(n)
        receive.close()


async def main(processes: int, type_count: int) -> None:
    """Fill, then measure."""
    with RedisServer() as server:
        redis = Redis.from_url(server.url, max_connections=100)
        store = EventStore(redis, EventRegistry(FRAMEWORK_EVENTS), keyspace=Keyspace("bench"))
        types = [f"type-{i}" for i in range(type_count)]
        memory_before = int((await redis.info("memory"))["used_memory"])
        began = time.perf_counter()
        await populate(store, processes, types)
        filled = time.perf_counter() - began
        memory = int((await redis.info("memory"))["used_memory"]) - memory_before
        index_bytes = 0
        for process_type in types:
            for key in store.keyspace.process_index(0, process_type):
                index_bytes += int(await redis.memory_usage(key, samples=0) or 0)
        await write_heartbeat(redis, store.keyspace, Heartbeat("w", "h", 1, [], 0.0), 600)
        settings = HealthSettings(
            average_duration_warning=30, max_process_age=1, max_retry_count=2
        )
        await anyio.sleep(1.1)
        with RoundTrips() as trips:
            began = time.perf_counter()
            report = await health_report(redis, store.keyspace, settings)
            health_s = time.perf_counter() - began
        with RoundTrips() as search_trips:
            began = time.perf_counter()
            page = await search_processes(redis, store.keyspace, state="active", limit=50)
            search_s = time.perf_counter() - began
        with RoundTrips() as correlation_trips:
            found = await search_processes(redis, store.keyspace, correlation_id="order-4711")
        refreshes = await console_refreshes(store, settings)
        print(f"{processes} active processes of {type_count} types: filled in {filled:.1f} s "
              f"({processes / filled:.0f} commits/s); everything stored (streams, shard log, "
              f"indexes) {memory / processes:.0f} bytes per process, of which the process "
              f"index {index_bytes / processes:.0f}")
        print(f"rsaga health: {trips.count} round trips, {health_s * 1000:.0f} ms; "
              f"active {sum(p.active for p in report.processes)}, over age "
              f"{sum(p.over_age for p in report.processes)}, retrying "
              f"{sum(p.retrying for p in report.processes)}; {len(report.problems)} problems")
        print(f"search, newest 50 active: {search_trips.count} round trips, "
              f"{search_s * 1000:.0f} ms; by correlation id: {correlation_trips.count} round "
              f"trips, {[r.stream_id for r in found.items]}; first page {len(page.items)}")
        for page_name, (trips_per_refresh, ms) in refreshes.items():
            print(f"console refresh of {page_name}: {trips_per_refresh} round trips, {ms:.0f} ms")
        await redis.aclose()


async def console_refreshes(
    store: EventStore, health: HealthSettings
) -> dict[str, tuple[int, float]]:
    """Round trips and milliseconds of one live refresh of each console page."""
    import httpx

    from rsaga.config import Settings, StoreSettings
    from rsaga.web import create_app

    settings = Settings(store=StoreSettings(prefix=store.keyspace.prefix), health=health)
    app = create_app(settings, open_store=lambda _: store, managers=[])
    found = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            for name, path in (("overview", "/"), ("process list", "/processes")):
                await client.get(path)  # warm
                with RoundTrips() as trips:
                    began = time.perf_counter()
                    answer = await client.get(path, headers={"X-Rsaga-Fragment": "1"})
                    took = (time.perf_counter() - began) * 1000
                answer.raise_for_status()
                found[name] = (trips.count, took)
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=100_000)
    parser.add_argument("--types", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.processes, args.types)
