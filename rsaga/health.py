"""Liveness: heartbeats of workers and schedulers, kept in Redis with a TTL.

A process that stops gracefully deletes its heartbeat; one that dies lets it
expire. `rsaga health` reads them to tell which processes are alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any

import anyio
import msgspec
from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rsaga.errors import RedisUnavailable

log = logging.getLogger("rsaga.health")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, RedisUnavailable, OSError)
"""Errors that mean Redis is unreachable right now: wait and try again, never give up."""

_TRANSIENT_ERRORS = (ReadOnlyError, BusyLoadingError, OutOfMemoryError)
_TRANSIENT_PREFIXES = (
    "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "UNBLOCKED",
    "OOM", "NOREPLICAS",
)


def redis_down(exc: BaseException) -> bool:
    """Whether `exc` means Redis cannot serve us right now (unreachable, loading, read-only
    after a failover, out of memory, busy...): wait and retry; it is nobody's fault."""
    if isinstance(exc, (*REDIS_DOWN, *_TRANSIENT_ERRORS)):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_PREFIXES)


class Heartbeat(msgspec.Struct, frozen=True):
    """What a live worker or scheduler tells about itself in Redis."""

    consumer: str
    host: str
    pid: int
    handlers: list[str]
    started_at: float
    kind: str = "worker"


def this_process(name: str, handlers: list[str], kind: str) -> Heartbeat:
    """The heartbeat of the current process."""
    return Heartbeat(
        consumer=name,
        host=socket.gethostname(),
        pid=os.getpid(),
        handlers=handlers,
        started_at=time.time(),
        kind=kind,
    )


async def keep_heartbeat(
    redis: Redis, key: str, beat: Heartbeat, ttl: float, stop: anyio.Event
) -> None:
    """Renew `key` every third of `ttl` until `stop` is set, then delete it."""
    blob = msgspec.json.encode(beat)
    try:
        while not stop.is_set():
            try:
                await redis.set(key, blob, px=int(ttl * 1000))
            except Exception as exc:
                if not redis_down(exc):
                    raise
                log.warning("heartbeat failed: %s", exc)
            with anyio.move_on_after(ttl / 3):
                await stop.wait()
    finally:
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2),
            contextlib.suppress(*REDIS_DOWN),
        ):
            await redis.delete(key)


# --- the health report (`rsaga health`) --------------------------------------------------


class ProcessTypeHealth(msgspec.Struct):
    """Lifecycle figures of one process type, over every shard."""

    process_type: str
    started: int = 0
    completed: int = 0
    failed: int = 0
    compensated: int = 0
    """Ended cleanly compensated (a saga that undid its steps): not a failure."""
    active: int = 0
    stuck: int = 0
    """Active with no pending timeout and no progress for `stuck_after`, or with a
    timeout overdue by more than `overdue_after`; a process waiting on a future
    timeout is not stuck."""
    failure_rate: float = 0.0
    mean_duration_ms: float = 0.0
    p99_duration_ms: float = 0.0


class GroupHealth(msgspec.Struct):
    """One consumer group on one stream."""

    group: str
    stream: str
    lag: int
    pending: int


class HealthReport(msgspec.Struct):
    """What `rsaga health` found in Redis, and the verdict."""

    status: str
    """"ok", "warning" or "critical"."""
    problems: list[str]
    workers: list[Heartbeat]
    schedulers: list[Heartbeat]
    processes: list[ProcessTypeHealth]
    groups: list[GroupHealth]
    dead_letters: int
    overdue_timeouts: int

    @property
    def exit_code(self) -> int:
        """0 ok, 1 warning, 2 critical: usable as a container health check."""
        return {"ok": 0, "warning": 1, "critical": 2}[self.status]


async def live_heartbeats(redis: Redis, keyspace: Any) -> list[Heartbeat]:
    """The heartbeats of every live worker and scheduler under `keyspace`'s prefix."""
    beats: list[Heartbeat] = []
    async for key in redis.scan_iter(match=keyspace.heartbeat_pattern(), count=500):
        blob = await redis.get(key)
        if blob:
            with contextlib.suppress(msgspec.DecodeError):
                beats.append(msgspec.json.decode(blob, type=Heartbeat))
    return beats


async def health_report(redis: Redis, keyspace: Any, settings: Any) -> HealthReport:
    """Compute the health of a deployment from Redis alone (not one process's memory).

    `settings` is a `HealthSettings`; `keyspace` a `Keyspace`.
    """
    now_ms = await _server_ms(redis)
    beats = await live_heartbeats(redis, keyspace)
    types: set[str] = set()
    async for key in redis.scan_iter(match=keyspace.stats_pattern(), count=500):
        types.add(key.decode().split(":stats:", 1)[1])
    stuck_before = now_ms - int(settings.stuck_after * 1000)
    overdue_before = now_ms - int(settings.overdue_after * 1000)
    ordered = sorted(types)
    shards = range(keyspace.shards)
    streams = [s for shard in shards for s in (keyspace.log(shard), keyspace.due_timeouts(shard))]
    async with redis.pipeline(transaction=False) as pipe:  # one round trip for everything
        for process_type in ordered:
            for shard in shards:
                active = keyspace.active_processes(shard, process_type)
                waiting = keyspace.waiting_processes(shard, process_type)
                pipe.hgetall(keyspace.process_stats(shard, process_type))
                pipe.zcard(active)
                pipe.zcard(waiting)
                # Stuck: no pending timeout and no progress for stuck_after, or
                # the earliest pending timeout overdue by more than overdue_after.
                pipe.zcount(active, "-inf", stuck_before)
                pipe.zcount(waiting, "-inf", overdue_before)
                pipe.lrange(keyspace.process_durations(shard, process_type), 0, -1)
        for stream in streams:
            pipe.xinfo_groups(stream)
        for shard in shards:
            pipe.xlen(keyspace.dead_letters(shard))
            pipe.zcount(keyspace.timeouts(shard), "-inf", overdue_before)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    at = 0
    processes = []
    for process_type in ordered:
        figures = ProcessTypeHealth(process_type)
        durations: list[int] = []
        for _ in shards:
            stats, active, waiting, stuck, overdue_waits, recent = replies[at : at + 6]
            at += 6
            figures.started += int(stats.get(b"started", 0))
            figures.completed += int(stats.get(b"completed", 0))
            figures.failed += int(stats.get(b"failed", 0))
            figures.compensated += int(stats.get(b"compensated", 0))
            figures.mean_duration_ms += int(stats.get(b"duration_ms_total", 0))
            figures.active += int(active) + int(waiting)
            figures.stuck += int(stuck) + int(overdue_waits)
            durations += [int(d) for d in recent]
        finished = figures.completed + figures.failed + figures.compensated
        figures.mean_duration_ms = figures.mean_duration_ms / finished if finished else 0.0
        figures.failure_rate = figures.failed / finished if finished else 0.0
        if durations:
            durations.sort()
            figures.p99_duration_ms = float(
                durations[min(len(durations) - 1, int(len(durations) * 0.99))]
            )
        processes.append(figures)
    groups: list[GroupHealth] = []
    for stream in streams:
        infos = replies[at]
        at += 1
        if isinstance(infos, Exception):
            continue  # no such stream yet
        for info in infos:
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            groups.append(
                GroupHealth(name, stream, int(info.get("lag") or 0), int(info["pending"]))
            )
    dead_letters = overdue = 0
    for _ in shards:
        dead_letters += int(replies[at])
        overdue += int(replies[at + 1])
        at += 2
    return _verdict(
        settings,
        workers=[b for b in beats if b.kind == "worker"],
        schedulers=[b for b in beats if b.kind == "scheduler"],
        processes=processes,
        groups=groups,
        dead_letters=dead_letters,
        overdue=overdue,
    )


def _verdict(
    settings: Any,
    *,
    workers: list[Heartbeat],
    schedulers: list[Heartbeat],
    processes: list[ProcessTypeHealth],
    groups: list[GroupHealth],
    dead_letters: int,
    overdue: int,
) -> HealthReport:
    critical: list[str] = []
    warning: list[str] = []
    if (processes or groups) and not workers:
        critical.append("no live worker (no heartbeat)")
    if overdue:
        critical.append(
            f"{overdue} timeouts overdue by more than {settings.overdue_after:g}s "
            "(is a scheduler running?)"
        )
    for p in processes:
        if p.stuck:
            warning.append(
                f"{p.stuck} {p.process_type} processes stuck (no progress for "
                f"{settings.stuck_after:g}s and no timeout pending, or a timeout overdue by "
                f"more than {settings.overdue_after:g}s)"
            )
        finished = p.completed + p.failed + p.compensated
        if finished >= settings.min_finished and p.failure_rate >= settings.failure_rate_warning:
            warning.append(f"{p.process_type} failure rate {p.failure_rate:.0%}")
    for g in groups:
        if g.lag >= settings.lag_critical:
            critical.append(f"group {g.group} is {g.lag} entries behind")
        elif g.lag >= settings.lag_warning:
            warning.append(f"group {g.group} is {g.lag} entries behind")
    if dead_letters >= settings.dead_letters_warning:
        warning.append(f"{dead_letters} dead letters")
    status = "critical" if critical else "warning" if warning else "ok"
    return HealthReport(
        status, critical + warning, workers, schedulers, processes, groups, dead_letters, overdue
    )


async def _server_ms(redis: Redis) -> int:
    now: Any = await redis.time()
    seconds, micros = now
    return int(seconds) * 1000 + int(micros) // 1000


def report_lines(report: HealthReport) -> list[str]:
    """`report` as a readable table."""
    lines = [f"status: {report.status.upper()}"]
    lines += [f"  - {problem}" for problem in report.problems]
    lines.append(f"workers: {len(report.workers)} live, schedulers: {len(report.schedulers)} live")
    for beat in [*report.workers, *report.schedulers]:
        lines.append(f"  {beat.kind:<9} {beat.consumer}  pid {beat.pid} on {beat.host}")
    if report.processes:
        lines.append(
            f"{'process type':<22}{'started':>9}{'done':>9}{'failed':>8}{'comp.':>8}{'rate':>7}"
            f"{'active':>8}{'stuck':>7}{'mean ms':>10}{'p99 ms':>10}"
        )
        for p in report.processes:
            lines.append(
                f"{p.process_type:<22}{p.started:>9}{p.completed:>9}{p.failed:>8}"
                f"{p.compensated:>8}{p.failure_rate:>7.0%}{p.active:>8}{p.stuck:>7}{p.mean_duration_ms:>10.0f}"
                f"{p.p99_duration_ms:>10.0f}"
            )
    if report.groups:
        lines.append(f"{'consumer group':<28}{'lag':>8}{'pending':>9}  stream")
        for g in report.groups:
            lines.append(f"{g.group:<28}{g.lag:>8}{g.pending:>9}  {g.stream}")
    lines.append(
        f"dead letters: {report.dead_letters}, overdue timeouts: {report.overdue_timeouts}"
    )
    return lines
