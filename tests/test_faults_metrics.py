"""The metrics endpoint under hostile clients, and gauges that say when they are stale."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from fault_kit import RsagaProcess, Workload, connect, make_store, outputs, wait_for
from redis.asyncio import Redis

from rsaga import metrics
from rsaga.metrics import PrometheusObserver, refresh_loop, start_metrics_server
from rsaga.testing import RedisServer, free_port


def http(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def get(port: int, accept: str = "") -> tuple[bytes, bytes]:
    extra = f"Accept: {accept}\r\n".encode() if accept else b""
    head, _, body = http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n").partition(
        b"\r\n\r\n"
    )
    return head, body


@pytest.fixture
def served() -> Iterator[tuple[PrometheusObserver, int]]:
    observer = PrometheusObserver()
    server = start_metrics_server(observer.registry, 0, "127.0.0.1")
    yield observer, server.server_port
    server.shutdown()
    server.server_close()


def test_metrics_bring_the_standard_collectors_head_and_openmetrics(
    served: tuple[PrometheusObserver, int],
) -> None:
    _, port = served
    head, body = get(port)
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"process_cpu_seconds_total" in body
    assert b"python_info" in body
    assert b"rsaga_redis_up" in body
    assert b"rsaga_redis_gauges_age_seconds +Inf" in body  # never refreshed
    head, body = get(port, "application/openmetrics-text; version=1.0.0")
    assert b"application/openmetrics-text" in head
    assert body.endswith(b"# EOF\n")
    reply = http(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert body == b""


def test_a_slow_client_is_dropped_and_does_not_block_scrapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics._QuietHandler, "timeout", 0.5)
    server = start_metrics_server(PrometheusObserver().registry, 0, "127.0.0.1")
    try:
        port = server.server_port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            slow.sendall(b"GET /metr")  # and never more
            head, _ = get(port)  # others are served meanwhile
            assert b" 200 " in head.split(b"\r\n")[0]
            started = time.monotonic()
            assert slow.recv(100) == b""  # the server hung up on it
            assert time.monotonic() - started < 3
    finally:
        server.shutdown()
        server.server_close()


async def test_redis_gauges_say_when_they_are_stale(prefix: str) -> None:
    if not RedisServer.available():
        pytest.skip("redis-server is not on PATH")
    with RedisServer() as server:
        redis = Redis.from_url(server.url)
        observer = PrometheusObserver()
        store = make_store(redis, prefix)
        await observer.refresh(redis, store.keyspace, process_types=["alarm"])
        assert observer.redis_up._value.get() == 1
        fresh = observer._gauges_age()
        assert 0 <= fresh < 1
        server.kill()
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: refresh_loop(
                    observer, redis, store.keyspace, stop, interval=0.1, process_types=["alarm"]
                )
            )
            await anyio.sleep(0.5)
            stop.set()
        assert observer.redis_up._value.get() == 0
        assert observer._gauges_age() >= fresh + 0.4
        await redis.aclose()


async def test_a_worker_survives_more_metrics_clients_than_it_has_descriptors(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    worker = RsagaProcess(
        redis_server.url, prefix, tmp_path, args=("--metrics-port", str(port)), max_files=256
    )
    redis = connect(redis_server.url)
    workload = Workload(make_store(redis, prefix))
    idle: list[socket.socket] = []
    try:
        await workload.ping(["before"])
        await wait_for(workload.all_handled, 60, "the worker to start", lambda: outputs([worker]))
        for _ in range(400):  # more than its descriptor limit
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        await workload.ping([f"during-{n}" for n in range(50)], 3)
        await wait_for(workload.all_handled, 60, "events while clients hog the endpoint",
                       lambda: outputs([worker]))
        assert worker.alive, worker.output
        for sock in idle:
            sock.close()
        idle.clear()
        head, body = await anyio.to_thread.run_sync(get, port)
        assert b" 200 " in head.split(b"\r\n")[0], head
        assert b"rsaga_handler_events_total" in body
        assert worker.alive, worker.output
        assert "Traceback" not in worker.output, worker.output
    finally:
        for sock in idle:
            sock.close()
        worker.kill()
        await redis.aclose()
