"""Metrics, health and inspection: scraped over HTTP, computed from Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import msgspec
import pytest
from redis.asyncio import Redis
from rsaga_examples.orders import (
    WORLD_EVENTS,
    InventoryService,
    OrderFulfilment,
    OrderPlaced,
    PaymentService,
    ShippingService,
)

from rsaga import EventRegistry, EventStore, Executor, Keyspace
from rsaga.config import HealthSettings, WorkerSettings
from rsaga.health import Heartbeat, health_report
from rsaga.metrics import PrometheusObserver, serve_metrics
from rsaga.processes import (
    AdvanceTrigger,
    Decision,
    ProcessInfo,
    ProcessManager,
    ProcessRunner,
    StartTrigger,
    Trigger,
)
from rsaga.testing import free_port
from rsaga.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


async def scrape(port: int) -> dict[str, float]:
    """GET /metrics and parse the samples into {'name{labels}': value}."""
    async with await anyio.connect_tcp("127.0.0.1", port) as client:
        await client.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = b""
        with anyio.move_on_after(5):
            while True:
                try:
                    body += await client.receive()
                except anyio.EndOfStream:
                    break
    head, _, text = body.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_metrics_scraped_over_http_match_what_happened(redis: Redis, prefix: str) -> None:
    store = EventStore(redis, EventRegistry(WORLD_EVENTS), keyspace=Keyspace(prefix=prefix))
    observer = PrometheusObserver()
    handlers = [OrderFulfilment(), PaymentService(), InventoryService(), ShippingService()]
    worker = Worker(
        Executor(store, observer=observer), handlers, settings=WorkerSettings(block_ms=50)
    )
    port = free_port()
    orders = 4
    for n in range(orders):
        await store.append(f"order-{n}", [OrderPlaced(str(n), 10, "decline" if n == 0 else "ok")])
    stop = anyio.Event()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_metrics, observer.registry, port, stop, "127.0.0.1")
            tg.start_soon(worker.run, stop)
            stats_key = store.keyspace.process_stats(0, "order-fulfilment")
            while True:
                stats = await redis.hgetall(stats_key)
                if int(stats.get(b"completed", 0)) + int(stats.get(b"failed", 0)) == orders:
                    break
                await anyio.sleep(0.05)
            while True:  # the payment group reads the whole log (it skips most types)
                infos = await redis.xinfo_groups(store.keyspace.log(0))
                mine = [i for i in infos if i["name"] == b"payment-service"]
                if mine and not mine[0]["lag"] and not mine[0]["pending"]:
                    break
                await anyio.sleep(0.05)
            await observer.refresh(
                redis, store.keyspace, process_types=["order-fulfilment"],
                groups=[(store.keyspace.log(0), "payment-service")],
            )
            samples = await scrape(port)
            stop.set()
    label = '{process_type="order-fulfilment"}'
    assert samples[f"rsaga_processes_started_total{label}"] == orders
    assert samples[f"rsaga_processes_completed_total{label}"] == orders - 1
    assert samples[f"rsaga_processes_failed_total{label}"] == 1
    assert samples[f"rsaga_process_duration_seconds_count{label}"] == orders
    assert samples[f"rsaga_active_processes{label}"] == 0
    handled = samples['rsaga_handler_events_total{handler="payment-service",outcome="handled"}']
    assert handled == orders  # one payment request per order
    scheduled = samples['rsaga_timeouts_total{event="scheduled",process_type="order-fulfilment"}']
    assert scheduled >= orders
    assert samples['rsaga_commands_total{command="RequestPayment",outcome="written"}'] == orders
    lag = 'rsaga_consumer_lag{group="payment-service",stream="' + store.keyspace.log(0) + '"}'
    assert samples[lag] == 0


class Nudged(ProcessManager[int]):
    """Started and advanced explicitly; every nudge is progress."""

    name = "nudged"

    def initial_state(self) -> int:
        return 0

    def decide(self, state: int, trigger: Trigger, process: ProcessInfo) -> Decision:
        if isinstance(trigger, StartTrigger | AdvanceTrigger):
            return Decision(events=[Nudge()])
        return Decision()


class Nudge(msgspec.Struct, frozen=True):
    """Progress."""


async def test_a_stuck_process_flips_health_until_it_progresses(
    redis: Redis, prefix: str
) -> None:
    store = EventStore(redis, EventRegistry([Nudge]), keyspace=Keyspace(prefix=prefix))
    runner = ProcessRunner(Executor(store), [Nudged()])
    await redis.set(
        store.keyspace.heartbeat("w1"),
        msgspec.json.encode(Heartbeat("w1", "host", 1, ["nudged"], 0.0)),
        px=60_000,
    )
    thresholds = HealthSettings(stuck_after=1.0)
    await runner.start("nudged", "n1")
    report = await health_report(redis, store.keyspace, thresholds)
    assert (report.status, report.exit_code) == ("ok", 0)
    await anyio.sleep(1.2)
    report = await health_report(redis, store.keyspace, thresholds)
    assert report.exit_code == 1
    assert report.processes[0].stuck == 1
    assert report.problems[0].startswith("1 nudged processes stuck (no progress for 1s")
    await runner.advance("nudged", "n1")
    report = await health_report(redis, store.keyspace, thresholds)
    assert (report.status, report.processes[0].stuck) == ("ok", 0)


@pytest.mark.slow
async def test_health_and_metrics_with_two_worker_processes_add_up(
    redis_server: object, prefix: str, tmp_path: Path
) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    redis = Redis.from_url(url)
    store = EventStore(redis, EventRegistry(WORLD_EVENTS), keyspace=Keyspace(prefix=prefix))
    env = {**os.environ, "RSAGA_REDIS_URL": url, "RSAGA_PREFIX": prefix}
    ports = [free_port(), free_port()]
    handlers = ["order-fulfilment", "payment-service", "inventory-service", "shipping-service"]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "rsaga.cli", "worker", "--metrics-port", str(port),
             *[a for h in handlers for a in ("--handler", h)]],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        orders = 40
        for n in range(orders):
            await store.append(f"order-{n}", [OrderPlaced(str(n), 10)])
        stats_key = store.keyspace.process_stats(0, "order-fulfilment")
        deadline = time.monotonic() + 60
        while int((await redis.hgetall(stats_key)).get(b"completed", 0)) < orders:
            assert time.monotonic() < deadline, "orders did not complete"
            await anyio.sleep(0.1)
        completed = [
            (await scrape(port)).get(
                'rsaga_processes_completed_total{process_type="order-fulfilment"}', 0.0
            )
            for port in ports
        ]
        assert sum(completed) == orders  # each counts its own part; together, all of them
        health = subprocess.run(
            [sys.executable, "-m", "rsaga.cli", "health", "--json"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
        )
        report = json.loads(health.stdout)
        assert len(report["workers"]) == 2
        [figures] = [p for p in report["processes"] if p["process_type"] == "order-fulfilment"]
        assert figures["started"] == figures["completed"] == orders
        assert health.returncode == 0, health.stdout
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(10)
        await redis.aclose()
