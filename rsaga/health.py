"""The health report (`rsaga health`): liveness and backlogs, read from Redis.

Heartbeats and `redis_down` live in `rsaga.runtime.liveness` (the runtime writes
them); they are re-exported here for code that imported them from this module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import msgspec
from redis.asyncio import Redis

from rsaga.clock import time_reply_ms
from rsaga.cluster import mget
from rsaga.keyspace import Keyspace
from rsaga.records import Heartbeat as Heartbeat
from rsaga.runtime.liveness import FORGET_DEAD_AFTER_MS as FORGET_DEAD_AFTER_MS
from rsaga.runtime.liveness import REDIS_DOWN as REDIS_DOWN
from rsaga.runtime.liveness import keep_heartbeat as keep_heartbeat
from rsaga.runtime.liveness import redis_down as redis_down
from rsaga.runtime.liveness import this_process as this_process
from rsaga.runtime.liveness import write_heartbeat as write_heartbeat

log = logging.getLogger("rsaga.health")

# --- the health report (`rsaga health`) --------------------------------------------------


LISTED = 20
"""Offending processes a health check lists by id (it counts them all)."""


class ProcessThresholds(msgspec.Struct, frozen=True):
    """The thresholds of the per-type health checks for one process type (0: off)."""

    average_duration_warning: float = 0.0
    """Seconds: the mean duration of the last 1,000 finished processes above it warns."""
    max_process_age: float = 0.0
    """Seconds: an active process started longer ago than it warns."""
    max_retry_count: int = 0
    """An active process whose current step has been retried this many times warns."""


def process_thresholds(settings: Any, managers: Iterable[Any]) -> dict[str, ProcessThresholds]:
    """The thresholds of each process manager class in `managers`: its own
    `average_duration_warning`, `max_process_age` and `max_retry_count` where set (not
    None), else the defaults of `settings` (a `HealthSettings`)."""
    found = {}
    for manager in managers:
        values = {
            name: default if getattr(manager, name, None) is None else getattr(manager, name)
            for name, default in msgspec.structs.asdict(default_thresholds(settings)).items()
        }
        found[manager.name] = ProcessThresholds(**values)
    return found


def default_thresholds(settings: Any) -> ProcessThresholds:
    """The `[health]` defaults of the per-type thresholds (`settings` is a `HealthSettings`)."""
    return ProcessThresholds(
        settings.average_duration_warning, settings.max_process_age, settings.max_retry_count
    )


class AgedProcess(msgspec.Struct):
    """An active process older than its type's `max_process_age`."""

    stream_id: str
    age_s: float


class RetriedProcess(msgspec.Struct):
    """An active process whose current step has been retried `max_retry_count` times or more."""

    stream_id: str
    step: str
    retries: int


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
    """Over every finished process."""
    p99_duration_ms: float = 0.0
    """Over the last 1,000 finished processes (per shard)."""
    recent_mean_duration_ms: float = 0.0
    """Over the last 1,000 finished processes (per shard): what the average-duration check
    compares."""
    thresholds: ProcessThresholds = msgspec.field(default_factory=ProcessThresholds)
    """The thresholds the per-type checks applied (0: off)."""
    over_age: int = 0
    """Active processes older than `thresholds.max_process_age`."""
    oldest: list[AgedProcess] = msgspec.field(default_factory=list)
    """The oldest of them, at most 20."""
    retrying: int = 0
    """Active processes retried `thresholds.max_retry_count` times or more."""
    most_retried: list[RetriedProcess] = msgspec.field(default_factory=list)
    """The most retried of them, at most 20."""


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


async def live_heartbeats(redis: Redis, keyspace: Keyspace) -> list[Heartbeat]:
    """The heartbeats of every live worker and scheduler under `keyspace`'s prefix, found
    through the heartbeat index (no keyspace scan): two round trips."""
    consumers: Any = await redis.zrange(keyspace.heartbeats(), 0, -1)
    if not consumers:
        return []
    blobs = await mget(redis, [keyspace.heartbeat(c.decode()) for c in consumers])
    return _heartbeats(blobs)


def _heartbeats(blobs: Iterable[Any]) -> list[Heartbeat]:
    """The heartbeats among GET replies (gone, unreadable or failed ones left out)."""
    beats: list[Heartbeat] = []
    for blob in blobs:
        if blob and not isinstance(blob, Exception):
            with contextlib.suppress(msgspec.DecodeError):
                beats.append(Heartbeat.decode(blob))
    return beats


async def health_report(
    redis: Redis,
    keyspace: Keyspace,
    settings: Any,
    thresholds: Mapping[str, ProcessThresholds] | None = None,
) -> HealthReport:
    """Compute the health of a deployment from Redis alone (not one process's memory).

    `settings` is a `HealthSettings`; `thresholds` the per-type thresholds (see
    `process_thresholds`), the defaults of `settings` for types not in it. Three
    round trips, whatever the number of processes.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.execute_command("TIME")  # not .time(): refused in a cluster pipeline
        pipe.zrange(keyspace.heartbeats(), 0, -1)
        for shard in range(keyspace.shards):
            pipe.smembers(keyspace.process_types(shard))
        now, consumers, *type_sets = await pipe.execute()
    now_ms = time_reply_ms(now)
    ordered = sorted({t.decode() for types in type_sets for t in types})
    defaults = default_thresholds(settings)
    limits = {t: (thresholds or {}).get(t, defaults) for t in ordered}
    stuck_before = now_ms - int(settings.stuck_after * 1000)
    overdue_before = now_ms - int(settings.overdue_after * 1000)
    shards = range(keyspace.shards)
    streams = [s for shard in shards for s in (keyspace.log(shard), keyspace.due_timeouts(shard))]
    async with redis.pipeline(transaction=False) as pipe:  # one round trip for everything
        for consumer in consumers:
            pipe.get(keyspace.heartbeat(consumer.decode()))
        for process_type in ordered:
            limit = limits[process_type]
            old_before = now_ms - int(limit.max_process_age * 1000)
            for shard in shards:
                active = keyspace.active_processes(shard, process_type)
                waiting = keyspace.waiting_processes(shard, process_type)
                since = keyspace.processes_since(shard, process_type)
                retrying = keyspace.retrying_processes(shard, process_type)
                pipe.hgetall(keyspace.process_stats(shard, process_type))
                pipe.zcard(active)
                pipe.zcard(waiting)
                # Stuck: no pending timeout and no progress for stuck_after, or
                # the earliest pending timeout overdue by more than overdue_after.
                pipe.zcount(active, "-inf", stuck_before)
                pipe.zcount(waiting, "-inf", overdue_before)
                pipe.lrange(keyspace.process_durations(shard, process_type), 0, -1)
                if limit.max_process_age:
                    pipe.zcount(since, "-inf", old_before)
                    pipe.zrangebyscore(
                        since, "-inf", old_before, start=0, num=LISTED, withscores=True
                    )
                if limit.max_retry_count:
                    pipe.zcount(retrying, limit.max_retry_count, "+inf")
                    pipe.zrevrangebyscore(
                        retrying, "+inf", limit.max_retry_count, start=0, num=LISTED,
                        withscores=True,
                    )
        for stream in streams:
            pipe.xinfo_groups(stream)
        for shard in shards:
            pipe.xlen(keyspace.dead_letters(shard))
            pipe.zcount(keyspace.timeouts(shard), "-inf", overdue_before)
        replies = iter(await pipe.execute(raise_on_error=False))
    beats = _heartbeats([next(replies) for _ in consumers])
    processes = []
    retried: dict[tuple[int, str], list[tuple[bytes, float]]] = {}
    for process_type in ordered:
        figures = ProcessTypeHealth(process_type, thresholds=limits[process_type])
        _add_shard_figures(figures, replies, shards, now_ms, retried)
        processes.append(figures)
    groups: list[GroupHealth] = []
    for stream in streams:
        infos = next(replies)
        if isinstance(infos, Exception):
            continue  # no such stream yet
        for info in infos:
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            groups.append(
                GroupHealth(name, stream, int(info.get("lag") or 0), int(info["pending"]))
            )
    dead_letters = overdue = 0
    for _ in shards:
        dead_letters += int(next(replies))
        overdue += int(next(replies))
    if retried:
        await _name_retried_steps(redis, keyspace, processes, retried)
    return _verdict(
        settings,
        workers=[b for b in beats if b.kind == "worker"],
        schedulers=[b for b in beats if b.kind == "scheduler"],
        processes=processes,
        groups=groups,
        dead_letters=dead_letters,
        overdue=overdue,
    )


def _add_shard_figures(
    figures: ProcessTypeHealth,
    replies: Iterator[Any],
    shards: range,
    now_ms: int,
    retried: dict[tuple[int, str], list[tuple[bytes, float]]],
) -> None:
    """Sum one process type's replies over `shards` into `figures`; note in `retried`
    the listed retrying processes of each (shard, type), whose steps are in their records."""
    limit = figures.thresholds
    durations: list[int] = []
    aged: list[AgedProcess] = []
    for shard in shards:
        stats, active, waiting, stuck, overdue_waits, recent = islice(replies, 6)
        figures.started += int(stats.get(b"started", 0))
        figures.completed += int(stats.get(b"completed", 0))
        figures.failed += int(stats.get(b"failed", 0))
        figures.compensated += int(stats.get(b"compensated", 0))
        figures.mean_duration_ms += int(stats.get(b"duration_ms_total", 0))
        figures.active += int(active) + int(waiting)
        figures.stuck += int(stuck) + int(overdue_waits)
        durations += [int(d) for d in recent]
        if limit.max_process_age:
            count, oldest = islice(replies, 2)
            figures.over_age += int(count)
            aged += [AgedProcess(m.decode(), (now_ms - start) / 1000) for m, start in oldest]
        if limit.max_retry_count:
            count, most = islice(replies, 2)
            figures.retrying += int(count)
            if most:
                retried[(shard, figures.process_type)] = most
    finished = figures.completed + figures.failed + figures.compensated
    figures.mean_duration_ms = figures.mean_duration_ms / finished if finished else 0.0
    figures.failure_rate = figures.failed / finished if finished else 0.0
    if durations:
        figures.recent_mean_duration_ms = sum(durations) / len(durations)
        durations.sort()
        figures.p99_duration_ms = float(
            durations[min(len(durations) - 1, int(len(durations) * 0.99))]
        )
    figures.oldest = sorted(aged, key=lambda p: -p.age_s)[:LISTED]


async def _name_retried_steps(
    redis: Redis,
    keyspace: Keyspace,
    processes: list[ProcessTypeHealth],
    retried: dict[tuple[int, str], list[tuple[bytes, float]]],
) -> None:
    """Fill each type's `most_retried` with the steps its records name (one round trip)."""
    async with redis.pipeline(transaction=False) as pipe:
        for (shard, process_type), members in retried.items():
            pipe.hmget(keyspace.process_records(shard, process_type), [m for m, _ in members])
        records = await pipe.execute()
    found: dict[str, list[RetriedProcess]] = {}
    for ((_, process_type), members), blobs in zip(retried.items(), records, strict=True):
        for (member, retries), blob in zip(members, blobs, strict=True):
            step = str(decode_process_record(blob).get("r", "?"))
            found.setdefault(process_type, []).append(
                RetriedProcess(member.decode(), step, int(retries))
            )
    for figures in processes:
        listed = found.get(figures.process_type, [])
        figures.most_retried = sorted(listed, key=lambda p: -p.retries)[:LISTED]


def decode_process_record(blob: bytes | None) -> dict[str, Any]:
    """A process record of the index (see `Keyspace.process_records`); {} if absent or bad."""
    if not blob:
        return {}
    try:
        record = msgspec.json.decode(blob)
    except msgspec.DecodeError:
        return {}
    return record if isinstance(record, dict) else {}


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
        warning += _threshold_problems(p)
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


def _threshold_problems(p: ProcessTypeHealth) -> list[str]:
    """The warnings of the per-type checks (average duration, age, retries) of `p`."""
    problems = []
    limit = p.thresholds
    mean_s = p.recent_mean_duration_ms / 1000
    if limit.average_duration_warning and mean_s > limit.average_duration_warning:
        problems.append(
            f"slow processes for {p.process_type}: mean {mean_s:.3g} s, "
            f"threshold {limit.average_duration_warning:g} s"
        )
    if p.over_age:
        listed = ", ".join(f"{o.stream_id} ({_age(o.age_s)})" for o in p.oldest)
        problems.append(
            f"{p.over_age} {p.process_type} processes older than {limit.max_process_age:g} s: "
            + listed + _more(p.over_age, len(p.oldest))
        )
    if p.retrying:
        listed = ", ".join(
            f"{r.stream_id} (step {r.step}, {r.retries} retries)" for r in p.most_retried
        )
        problems.append(
            f"{p.retrying} {p.process_type} processes retried at least {limit.max_retry_count} "
            "times: " + listed + _more(p.retrying, len(p.most_retried))
        )
    return problems


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _more(total: int, listed: int) -> str:
    return f" and {total - listed} more" if total > listed else ""


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
