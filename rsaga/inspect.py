"""Inspection for operators: processes, timeouts and streams, read from Redis in pages."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

import msgspec
from redis.asyncio import Redis

from rsaga.errors import EventDecodeError, UnknownEventType
from rsaga.keyspace import Keyspace, validate_stream_id
from rsaga.processes import (
    ProcessCompensated,
    ProcessCompleted,
    ProcessFailed,
    ProcessStarted,
    TimeoutCancelled,
    TimeoutFired,
    TimeoutScheduled,
    decode_timeout,
)
from rsaga.store import EventStore

STATES = ("active", "stuck", "failed", "compensated", "completed")


def _time(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class ProcessRow(msgspec.Struct):
    """One process in a listing."""

    stream_id: str
    process_type: str
    state: str
    at: datetime
    """Last progress (active, stuck), next due timeout (waiting, stuck while overdue), or
    end (completed, failed, compensated)."""


class EventRow(msgspec.Struct):
    """One event of a stream, as shown to an operator."""

    version: int
    occurred_at: datetime | None
    type: str
    data: Any
    correlation_id: str | None
    causation_id: str | None


class PendingTimeout(msgspec.Struct):
    """A timeout a process is waiting for."""

    name: str
    due_at: datetime
    attempt: int


class ProcessView(msgspec.Struct):
    """A process's whole history and where it stands."""

    stream_id: str
    status: str
    events: list[EventRow]
    pending_timeouts: list[PendingTimeout]


class TimeoutRow(msgspec.Struct):
    """One scheduled timeout."""

    process: str
    name: str
    due_at: datetime
    attempt: int
    overdue_ms: int


async def process_types(redis: Redis, keyspace: Keyspace) -> list[str]:
    """Every process type that has a lifecycle index in Redis."""
    found = set()
    async for key in redis.scan_iter(match=keyspace.stats_pattern(), count=500):
        found.add(key.decode().split(":stats:", 1)[1])
    return sorted(found)


async def list_processes(
    redis: Redis,
    keyspace: Keyspace,
    *,
    types: list[str],
    state: str = "active",
    limit: int = 50,
    stuck_after: float = 3600.0,
    overdue_after: float = 60.0,
) -> list[ProcessRow]:
    """Up to `limit` processes per shard in `state`; most recent first (stuck: oldest).

    Active processes waiting on a timeout are listed as "waiting", `at` their
    next due time. Stuck: no pending timeout and no progress for `stuck_after`
    seconds, or the next timeout overdue by more than `overdue_after` seconds.
    """
    now: Any = await redis.time()
    seconds, micros = now
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    rows: list[ProcessRow] = []
    for process_type in types:
        for shard in range(keyspace.shards):
            active = keyspace.active_processes(shard, process_type)
            waiting = keyspace.waiting_processes(shard, process_type)
            # (sorted set, state shown, newest first, or oldest before this score)
            sources: list[tuple[str, str, float | None]]
            if state in ("completed", "failed", "compensated"):
                sources = [(keyspace.finished_processes(shard, process_type, state), state, None)]
            elif state == "stuck":
                sources = [
                    (active, state, now_ms - stuck_after * 1000),
                    (waiting, state, now_ms - overdue_after * 1000),
                ]
            else:
                sources = [(active, "active", None), (waiting, "waiting", None)]
            for key, shown, before in sources:
                found: Any
                if before is None:
                    found = await redis.zrevrange(key, 0, limit - 1, withscores=True)
                else:
                    found = await redis.zrangebyscore(
                        key, "-inf", before, start=0, num=limit, withscores=True
                    )
                rows += [ProcessRow(m.decode(), process_type, shown, _time(s)) for m, s in found]
    return rows[:limit]


async def read_events(
    store: EventStore, stream_id: str, *, from_version: int = 1, limit: int = 1000
) -> list[EventRow]:
    """Up to `limit` events of a stream, each decoded if this process knows its type."""
    validate_stream_id(stream_id)
    page: Any = await store.redis.xrange(
        store.keyspace.stream(stream_id), f"{from_version}-0", "+", count=limit
    )
    rows = []
    for entry_id, fields in page:
        version = int(entry_id.partition(b"-")[0])
        try:
            event = store.codec.decode(stream_id, version, fields[b"d"])
        except (UnknownEventType, EventDecodeError, KeyError) as exc:
            rows.append(EventRow(version, None, "?", f"(cannot decode here: {exc})", None, None))
            continue
        rows.append(EventRow(version, event.occurred_at, event.type, event.data,
                             event.correlation_id, event.causation_id))
    return rows


async def show_process(store: EventStore, stream_id: str) -> ProcessView | None:
    """The history and state of the process with stream `stream_id`; None if unknown."""
    events: list[EventRow] = []
    while True:
        page = await read_events(store, stream_id, from_version=len(events) + 1, limit=1000)
        events += page
        if len(page) < 1000:
            break
    if not events or not any(isinstance(e.data, ProcessStarted) for e in events):
        return None
    status = "active"
    pending: dict[str, PendingTimeout] = {}
    for event in events:
        match event.data:
            case ProcessCompleted():
                status = "completed"
            case ProcessFailed():
                status = "failed"
            case ProcessCompensated():
                status = "compensated"
            case TimeoutScheduled(name=name, due_ms=due, attempt=attempt):
                pending[name] = PendingTimeout(name, _time(due), attempt)
            case TimeoutCancelled(name=name) | TimeoutFired(name=name):
                pending.pop(name, None)
    return ProcessView(stream_id, status, events, list(pending.values()))


async def list_timeouts(redis: Redis, keyspace: Keyspace, *, limit: int = 50) -> list[TimeoutRow]:
    """The next `limit` timeouts due, per shard, soonest first."""
    now: Any = await redis.time()
    seconds, micros = now
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    rows = []
    for shard in range(keyspace.shards):
        found: Any = await redis.zrange(keyspace.timeouts(shard), 0, limit - 1, withscores=True)
        if not found:
            continue
        blobs: Any = await redis.hmget(keyspace.timeout_data(shard), [m for m, _ in found])
        for (member, due), blob in zip(found, blobs, strict=True):
            process, _, name = member.decode().rpartition("|")
            attempt = 1
            if blob:
                with contextlib.suppress(msgspec.DecodeError):
                    attempt = decode_timeout(blob).attempt
            rows.append(TimeoutRow(process, name, _time(due), attempt, max(0, now_ms - int(due))))
    return sorted(rows, key=lambda r: r.due_at)[:limit]
