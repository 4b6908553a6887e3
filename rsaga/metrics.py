"""Prometheus metrics: an `Observer` that counts, gauges read from Redis, and `/metrics`.

Counters and histograms count what *this* process did; run one endpoint per
worker or scheduler process (each its own port) and let Prometheus sum them.
Gauges that describe shared state (active processes, consumer lag and pending,
scheduler backlog) are read from Redis, so every process reports the same
truth and a restart loses nothing; ``rsaga_redis_up`` and
``rsaga_redis_gauges_age_seconds`` say whether those values are fresh.

The endpoint is prometheus_client's own WSGI app (text or OpenMetrics by the
Accept header, gzip, the standard ``process_*`` and ``python_*`` collectors)
on a small threaded server that can never take the process down: at most
`MAX_CLIENTS` connections at once (more are closed at once, so scrapers can
never use up the process's file descriptors), each dropped after
`CLIENT_TIMEOUT` seconds of silence, and a failing ``accept()`` (the process
out of descriptors for other reasons) is logged and waited out.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import anyio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from redis.asyncio import Redis

from rsaga.clock import server_ms, time_reply_ms
from rsaga.health import ProcessThresholds
from rsaga.keyspace import Keyspace
from rsaga.observe import Observer
from rsaga.runtime.liveness import redis_outage

log = logging.getLogger("rsaga.metrics")

_DURATIONS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_PROCESS_DURATIONS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 86400)


MAX_CLIENTS = 16
"""Metrics connections served at once; more are closed as soon as they are accepted."""

CLIENT_TIMEOUT = 10.0
"""Seconds a metrics client may stay silent (idle or slow) before it is dropped."""


class PrometheusObserver(Observer):
    """Counts what the runtime reports, in its own `CollectorRegistry`.

    A registry of its own also gets the standard process, platform and GC
    collectors (the default registry has them already).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        r = self.registry
        self.started = Counter(
            "rsaga_processes_started", "Processes started.", ["process_type"], registry=r
        )
        self.completed = Counter(
            "rsaga_processes_completed", "Processes completed.", ["process_type"], registry=r
        )
        self.failed = Counter(
            "rsaga_processes_failed", "Processes failed.", ["process_type"], registry=r
        )
        self.compensated = Counter(
            "rsaga_processes_compensated",
            "Processes that ended compensated (undid their steps cleanly; not failed).",
            ["process_type"], registry=r,
        )
        self.runaway = Counter(
            "rsaga_processes_runaway",
            "Processes failed for stepping without outside input (a timeout loop).",
            ["process_type"], registry=r,
        )
        self.removed = Counter(
            "rsaga_processes_removed",
            "Finished processes removed once their retention passed (by this scheduler).",
            ["process_type"], registry=r,
        )
        self.late_triggers = Counter(
            "rsaga_process_late_triggers",
            "Triggers ignored because their process finished and was removed (retention).",
            ["process_type"], registry=r,
        )
        self.duration = Histogram(
            "rsaga_process_duration_seconds", "Start to completion or failure.",
            ["process_type"], buckets=_PROCESS_DURATIONS, registry=r,
        )
        self.active = Gauge(
            "rsaga_active_processes", "Active processes (read from Redis).", ["process_type"],
            registry=r,
        )
        self.over_age = Gauge(
            "rsaga_processes_over_age",
            "Active processes older than their type's max_process_age (read from Redis; "
            "0 while the check is off).", ["process_type"], registry=r,
        )
        self.retrying = Gauge(
            "rsaga_processes_retrying",
            "Active processes whose current step has been retried max_retry_count times or "
            "more, or at all while that check is off (read from Redis).", ["process_type"],
            registry=r,
        )
        self.commands = Counter(
            "rsaga_commands", "Commands executed, by outcome.", ["command", "outcome"], registry=r
        )
        self.conflicts = Counter(
            "rsaga_command_conflicts", "Version conflicts (each one retried).", ["command"],
            registry=r,
        )
        self.handled = Counter(
            "rsaga_handler_events", "Entries finished by handlers, by outcome "
            "(handled, skipped, retried, dead_lettered).", ["handler", "outcome"], registry=r,
        )
        self.handler_failures = Counter(
            "rsaga_handler_failures", "Handler attempts that raised.", ["handler"], registry=r
        )
        self.handler_duration = Histogram(
            "rsaga_handler_duration_seconds", "Time of the handler call that handled an entry.",
            ["handler"], buckets=_DURATIONS, registry=r,
        )
        self.lag = Gauge(
            "rsaga_consumer_lag", "Entries not yet delivered to a group (read from Redis).",
            ["group", "stream"], registry=r,
        )
        self.pending = Gauge(
            "rsaga_consumer_pending", "Entries delivered, not yet acknowledged (from Redis).",
            ["group", "stream"], registry=r,
        )
        self.timeouts = Counter(
            "rsaga_timeouts", "Timeouts scheduled, fired and discarded.",
            ["process_type", "event"], registry=r,
        )
        self.lateness = Histogram(
            "rsaga_timeout_lateness_seconds", "Fired time minus due time.", ["process_type"],
            buckets=_DURATIONS, registry=r,
        )
        self.moved = Counter(
            "rsaga_timeouts_moved", "Due timeouts moved by this scheduler.", ["shard"], registry=r
        )
        self.backlog = Gauge(
            "rsaga_scheduler_backlog", "Timeouts due but not yet moved (read from Redis).",
            ["shard"], registry=r,
        )
        self.compensations = Counter(
            "rsaga_saga_compensations", "Saga steps compensated.", ["saga"], registry=r
        )
        self.compensation_failures = Counter(
            "rsaga_saga_compensation_failures", "Sagas whose compensation failed for good.",
            ["saga"], registry=r,
        )
        self.redis_up = Gauge(
            "rsaga_redis_up",
            "1 if the last read of the gauges from Redis succeeded, else 0.",
            registry=r,
        )
        self.gauges_age = Gauge(
            "rsaga_redis_gauges_age_seconds",
            "Seconds since the gauges read from Redis were last refreshed (+Inf: never).",
            registry=r,
        )
        self._refreshed_at: float | None = None
        self.gauges_age.set_function(self._gauges_age)
        self._children: dict[tuple[Any, ...], Any] = {}

    def _gauges_age(self) -> float:
        if self._refreshed_at is None:
            return math.inf
        return time.monotonic() - self._refreshed_at

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def command_executed(
        self, command: str, *, seconds: float, attempts: int, outcome: str
    ) -> None:
        """Count a command by outcome, and its conflicts."""
        self._child(self.commands, command, outcome).inc()
        if attempts > 1:
            self._child(self.conflicts, command).inc(attempts - 1)

    def entry_handled(self, group: str, *, seconds: float, outcome: str) -> None:
        """Count an entry by outcome; time the handled ones."""
        self._child(self.handled, group, outcome).inc()
        if outcome in ("retried", "dead_lettered"):
            self._child(self.handler_failures, group).inc()
        if outcome == "handled":
            self._child(self.handler_duration, group).observe(seconds)

    def process_transition(self, process_type: str, transition: str, duration_ms: int) -> None:
        """Count starts, completions, failures and compensations; time the finished ones."""
        if transition == "start":
            self._child(self.started, process_type).inc()
            return
        if transition == "runaway":  # reported with its "fail", which counts it as failed
            self._child(self.runaway, process_type).inc()
            return
        if transition == "late_trigger":
            self._child(self.late_triggers, process_type).inc()
            return
        counter = {"complete": self.completed, "compensate": self.compensated}.get(
            transition, self.failed
        )
        self._child(counter, process_type).inc()
        self._child(self.duration, process_type).observe(duration_ms / 1000)

    def timeout_event(self, process_type: str, kind: str, lateness_ms: float = 0.0) -> None:
        """Count timeouts; record the lateness of fired ones."""
        self._child(self.timeouts, process_type, kind).inc()
        if kind == "fired":
            self._child(self.lateness, process_type).observe(lateness_ms / 1000)

    def saga_event(self, saga: str, kind: str) -> None:
        """Count compensations and compensation failures."""
        counter = self.compensations if kind == "compensated" else self.compensation_failures
        self._child(counter, saga).inc()

    def timeouts_moved(self, shard: int, moved: int) -> None:
        """Count moved timeouts."""
        self._child(self.moved, str(shard)).inc(moved)

    def processes_removed(self, process_type: str, removed: int) -> None:
        """Count removed processes."""
        self._child(self.removed, process_type).inc(removed)

    # --- gauges read from Redis ---------------------------------------------------------

    async def refresh(
        self,
        redis: Redis,
        keyspace: Keyspace,
        *,
        process_types: Iterable[str] = (),
        groups: Iterable[tuple[str, str]] = (),
        scheduler: bool = False,
        thresholds: Mapping[str, ProcessThresholds] | None = None,
    ) -> None:
        """Read the shared gauges from Redis (one pipelined round trip, two when a type
        has a `max_process_age`, which counts from the server's time).

        `thresholds` are each process type's (see `rsaga.health.process_thresholds`).
        """
        types = list(process_types)
        streams = sorted({stream for stream, _ in groups})
        wanted = set(groups)
        limits = {t: (thresholds or {}).get(t, ProcessThresholds()) for t in types}
        now_ms = 0
        if any(limit.max_process_age for limit in limits.values()):
            now_ms = await server_ms(redis)
        async with redis.pipeline(transaction=False) as pipe:
            for process_type in types:
                limit = limits[process_type]
                old_before = now_ms - int(limit.max_process_age * 1000)
                for shard in range(keyspace.shards):
                    pipe.zcard(keyspace.active_processes(shard, process_type))
                    pipe.zcard(keyspace.waiting_processes(shard, process_type))
                    if limit.max_process_age:
                        since = keyspace.processes_since(shard, process_type)
                        pipe.zcount(since, "-inf", old_before)
                    pipe.zcount(
                        keyspace.retrying_processes(shard, process_type),
                        limit.max_retry_count or 1, "+inf",
                    )
            for stream in streams:
                pipe.xinfo_groups(stream)
            if scheduler:
                pipe.execute_command("TIME")  # not .time(): refused in a cluster pipeline
                for shard in range(keyspace.shards):
                    pipe.zrange(keyspace.timeouts(shard), 0, 0, withscores=True)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except Exception:
                self.redis_up.set(0)
                raise
        self.redis_up.set(1)
        self._refreshed_at = time.monotonic()
        at = 0
        for process_type in types:
            kinds = ["active", "waiting", "old", "retrying"]
            if not limits[process_type].max_process_age:
                kinds.remove("old")
            counts = dict.fromkeys(kinds, 0)
            for _ in range(keyspace.shards):
                for kind in kinds:
                    reply = replies[at]
                    at += 1
                    counts[kind] += 0 if isinstance(reply, Exception) else int(reply)
            self._child(self.active, process_type).set(counts["active"] + counts["waiting"])
            self._child(self.over_age, process_type).set(counts.get("old", 0))
            self._child(self.retrying, process_type).set(counts["retrying"])
        for stream in streams:
            infos = replies[at]
            at += 1
            if isinstance(infos, Exception):
                continue
            for info in infos:
                name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
                if (stream, name) in wanted:
                    self._child(self.lag, name, stream).set(info.get("lag") or 0)
                    self._child(self.pending, name, stream).set(info["pending"])
        if scheduler:
            now_ms = time_reply_ms(replies[at])
            for shard in range(keyspace.shards):
                head = replies[at + 1 + shard]
                due = bool(head) and head[0][1] <= now_ms
                count = await redis.zcount(keyspace.timeouts(shard), "-inf", now_ms) if due else 0
                self._child(self.backlog, str(shard)).set(count)


class _QuietHandler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT  # a socket timeout: idle and slow clients are dropped

    def log_message(self, format: str, *args: Any) -> None:
        """Log no request lines."""


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """Thread per connection, at most `MAX_CLIENTS` of them; survives a failing accept()."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._refusals = 0
        super().__init__(address, _QuietHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The connection stays queued; waiting keeps this thread from spinning.
                log.warning("metrics: cannot accept a connection: %s; retrying", exc)
                time.sleep(0.5)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refusals += 1
            if self._refusals in (1, 10, 100) or self._refusals % 1000 == 0:
                log.warning(
                    "metrics: %d connections refused, %d already open",
                    self._refusals, MAX_CLIENTS,
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: connection from %s failed", client_address, exc_info=True)


def _with_head(app: Callable[..., Any]) -> Callable[..., Any]:
    """`app` answering HEAD like GET without the body (prometheus_client knows only GET)."""

    def answer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["REQUEST_METHOD"] != "HEAD":
            return app(environ, start_response)
        body = app({**environ, "REQUEST_METHOD": "GET"}, start_response)
        return [b"" for _ in body]

    return answer


def start_metrics_server(
    registry: CollectorRegistry, port: int, host: str = "0.0.0.0"
) -> _MetricsServer:
    """Serve `registry` on ``http://host:port/metrics`` from a daemon thread; returns the server.

    Stop it with ``server.shutdown()`` and ``server.server_close()``.
    """
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server = _MetricsServer((str(address[0]), int(address[1])), family)
    server.set_app(_with_head(make_wsgi_app(registry)))
    threading.Thread(target=server.serve_forever, name="rsaga-metrics", daemon=True).start()
    log.info("serving metrics on http://%s:%d/metrics", host, server.server_port)
    return server


async def serve_metrics(
    registry: CollectorRegistry, port: int, stop: anyio.Event, host: str = "0.0.0.0"
) -> None:
    """Serve the registry on ``http://host:port/metrics`` until `stop` is set."""
    server = start_metrics_server(registry, port, host)
    try:
        await stop.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.shutdown)
        server.server_close()


async def refresh_loop(
    observer: PrometheusObserver,
    redis: Redis,
    keyspace: Keyspace,
    stop: anyio.Event,
    *,
    interval: float = 5.0,
    process_types: Iterable[str] = (),
    groups: Iterable[tuple[str, str]] = (),
    scheduler: bool = False,
    thresholds: Mapping[str, ProcessThresholds] | None = None,
) -> None:
    """Refresh the Redis-backed gauges every `interval` seconds until `stop` is set."""
    types, pairs = list(process_types), list(groups)
    while not stop.is_set():
        with redis_outage() as outage:
            await observer.refresh(
                redis, keyspace, process_types=types, groups=pairs, scheduler=scheduler,
                thresholds=thresholds,
            )
        if outage.error is not None:
            observer.redis_up.set(0)
            log.warning("could not refresh metrics from Redis: %s", outage.error)
        with anyio.move_on_after(interval):
            await stop.wait()
