"""Inspection for operators: processes, timeouts and streams, read from Redis in pages."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rsaga.clock import server_ms
from rsaga.config import HealthSettings
from rsaga.errors import EventDecodeError, UnknownEventType, ValidationError
from rsaga.health import ProcessThresholds, decode_process_record, default_thresholds
from rsaga.keyspace import FINISHED_OUTCOMES, Keyspace, validate_stream_id
from rsaga.process.api import ProcessInfo
from rsaga.process.engine import fold_info
from rsaga.process.events import ProcessRemoved, ProcessStarted
from rsaga.process.timeouts import decode_timeout, split_timeout_id
from rsaga.records import DATA
from rsaga.store import EventStore, is_tombstone_error

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
    """Every process type that has a lifecycle index in Redis (from the index of types
    the process commits keep: no scan)."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(keyspace.shards):
            pipe.smembers(keyspace.process_types(shard))
        replies = await pipe.execute()
    return sorted({t.decode() for types in replies for t in types})


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
    now_ms = await server_ms(redis)
    rows: list[ProcessRow] = []
    for process_type in types:
        for shard in range(keyspace.shards):
            active = keyspace.active_processes(shard, process_type)
            waiting = keyspace.waiting_processes(shard, process_type)
            # (sorted set, state shown, newest first, or oldest before this score)
            sources: list[tuple[str, str, float | None]]
            if state in FINISHED_OUTCOMES:
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
    key = store.keyspace.stream(stream_id)
    try:
        page: Any = await store.redis.xrange(key, f"{from_version}-0", "+", count=limit)
    except ResponseError as exc:
        if not is_tombstone_error(exc):
            raise
        page = [(b"1-0", {DATA: await store.redis.get(key)})] if from_version <= 1 else []
    rows = []
    for entry_id, fields in page:
        version = int(entry_id.partition(b"-")[0])
        try:
            event = store.codec.decode(stream_id, version, fields[DATA])
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
    if not any(isinstance(e.data, ProcessStarted | ProcessRemoved) for e in events):
        return None
    info = ProcessInfo("", "", stream_id)
    for event in events:
        at = event.occurred_at
        fold_info(info, event.data, int(at.timestamp() * 1000) if at is not None else 0)
    pending = [
        PendingTimeout(name, _time(info.due[name]), info.attempts[name]) for name in info.pending
    ]
    return ProcessView(stream_id, info.status, events, pending)


async def list_timeouts(redis: Redis, keyspace: Keyspace, *, limit: int = 50) -> list[TimeoutRow]:
    """The next `limit` timeouts due, per shard, soonest first."""
    now_ms = await server_ms(redis)
    rows = []
    for shard in range(keyspace.shards):
        found: Any = await redis.zrange(keyspace.timeouts(shard), 0, limit - 1, withscores=True)
        if not found:
            continue
        blobs: Any = await redis.hmget(keyspace.timeout_data(shard), [m for m, _ in found])
        for (member, due), blob in zip(found, blobs, strict=True):
            process, name = split_timeout_id(member.decode())
            attempt = 1
            if blob:
                with contextlib.suppress(msgspec.DecodeError):
                    attempt = decode_timeout(blob).attempt
            rows.append(TimeoutRow(process, name, _time(due), attempt, max(0, now_ms - int(due))))
    return sorted(rows, key=lambda r: r.due_at)[:limit]


# --- search ------------------------------------------------------------------------------

SEARCH_STATES = (*STATES, "old", "retrying")
"""States `search_processes` filters on: active (every unfinished process, shown as
active, waiting or stuck), stuck, completed, compensated, failed, old (older than its
type's `max_process_age`) and retrying (current step retried at least `max_retry_count`
times, or at all when that check is off)."""

CANDIDATES_CAP = 10_000
"""Most processes one shard and type yields to a search by correlation id, id prefix,
stuck or retrying (whose indexes are not ordered by time); the newest of them are kept."""

_BATCH = 200
_TYPE_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")  # as `rsaga.handlers.check_name` allows
T = TypeVar("T")


class Page(msgspec.Struct, Generic[T]):
    """One page of a listing, newest first."""

    items: list[T]
    cursor: str | None
    """Pass it back as `cursor` for the next page; None when this is the last page."""


class SearchRow(msgspec.Struct):
    """One process found by `search_processes`."""

    stream_id: str
    process_type: str
    state: str
    """active, waiting (active with a pending timeout), stuck, completed, failed or
    compensated."""
    started_at: datetime | None
    """None for a process indexed before rsaga recorded starts."""
    finished_at: datetime | None
    correlation_id: str | None
    """The correlation id the process started in."""
    retry_step: str | None = None
    retries: int = 0
    """How many times its current step has been retried (0: not retrying)."""


class _Query(msgspec.Struct):
    state: str | None
    correlation_id: str | None
    id_prefix: str | None
    started: tuple[int, int]
    finished: tuple[int, int]
    stuck_before: int
    overdue_before: int
    now_ms: int


class _Found(msgspec.Struct):
    at_ms: int
    row: SearchRow


async def search_processes(
    redis: Redis,
    keyspace: Keyspace,
    *,
    types: Sequence[str] | None = None,
    state: str | None = None,
    correlation_id: str | None = None,
    id_prefix: str | None = None,
    started_after: datetime | None = None,
    started_before: datetime | None = None,
    finished_after: datetime | None = None,
    finished_before: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
    settings: HealthSettings | None = None,
    thresholds: Mapping[str, ProcessThresholds] | None = None,
) -> Page[SearchRow]:
    """Find processes by type, state, correlation id, process id prefix and time range.

    Every filter given must hold. Newest first: unfinished processes by start,
    finished ones by end. `types` defaults to every indexed type; `state` (one of
    `SEARCH_STATES`) to any; `id_prefix` is the start of the process id (not of the
    stream id); time bounds are inclusive. `settings` (a `HealthSettings`) and
    `thresholds` (per type, see `rsaga.health.process_thresholds`) say what stuck,
    old and retrying mean. Finished processes are searchable while they are among
    the last 10,000 of their type and outcome on their shard. Reads only indexes
    the process commits keep: no keyspace scan.
    """
    if state is not None and state not in SEARCH_STATES:
        raise ValidationError(f"state must be one of {', '.join(SEARCH_STATES)}, got {state!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise ValidationError(f"limit must be an int from 1 to 10000, got {limit!r}")
    for process_type in types or ():
        if not isinstance(process_type, str) or _TYPE_NAME.fullmatch(process_type) is None:
            raise ValidationError(f"no process type can be named {process_type!r}")
    for name, text in (("correlation_id", correlation_id), ("id_prefix", id_prefix)):
        if text is not None and (not isinstance(text, str) or not text):
            raise ValidationError(f"{name} must be a non-empty str, got {text!r}")
    after = _parse_cursor(cursor)
    health = settings or HealthSettings()
    now_ms = await server_ms(redis)
    query = _Query(
        state,
        correlation_id,
        id_prefix,
        (_ms(started_after, -_FOREVER), _ms(started_before, _FOREVER)),
        (_ms(finished_after, -_FOREVER), _ms(finished_before, _FOREVER)),
        now_ms - int(health.stuck_after * 1000),
        now_ms - int(health.overdue_after * 1000),
        now_ms,
    )
    defaults = default_thresholds(health)
    found: list[_Found] = []
    for process_type in types if types is not None else await process_types(redis, keyspace):
        limits = (thresholds or {}).get(process_type, defaults)
        for shard in range(keyspace.shards):
            searcher = _ShardSearch(redis, keyspace, shard, process_type, query, limits, after)
            found += await searcher.run(limit + 1)  # one more: is there a next page?
    found.sort(key=_newest_first, reverse=True)
    page = found[:limit]
    more = len(found) > limit
    next_cursor = f"{page[-1].at_ms}:{page[-1].row.stream_id}" if more else None
    return Page([f.row for f in page], next_cursor)


_FOREVER = 2**62


def _ms(when: datetime | None, default: int) -> int:
    if when is None:
        return default
    if when.tzinfo is None:
        raise ValidationError(f"time bounds must carry a time zone, got {when.isoformat()}")
    return int(when.timestamp() * 1000)


def _newest_first(found: _Found) -> tuple[int, str]:
    return found.at_ms, found.row.stream_id


def _parse_cursor(cursor: str | None) -> tuple[int, str] | None:
    if cursor is None:
        return None
    at, _, stream_id = cursor.partition(":")
    if not at.lstrip("-").isdigit() or not stream_id:
        raise ValidationError(f"cursor {cursor!r} is not one a search returned")
    return int(at), stream_id


class _ShardSearch:
    """The search over one process type on one shard."""

    def __init__(
        self,
        redis: Redis,
        keyspace: Keyspace,
        shard: int,
        process_type: str,
        query: _Query,
        limits: ProcessThresholds,
        after: tuple[int, str] | None,
    ) -> None:
        self.redis, self.query, self.limits, self.after = redis, query, limits, after
        self.process_type = process_type
        self.active = keyspace.active_processes(shard, process_type)
        self.waiting = keyspace.waiting_processes(shard, process_type)
        self.since = keyspace.processes_since(shard, process_type)
        self.retrying = keyspace.retrying_processes(shard, process_type)
        self.records = keyspace.process_records(shard, process_type)
        self.by_correlation = keyspace.processes_by_correlation(shard, process_type)
        self.by_id = keyspace.processes_by_id(shard, process_type)
        self.finished = {
            o: keyspace.finished_processes(shard, process_type, o) for o in FINISHED_OUTCOMES
        }
        self.old_before = (
            query.now_ms - int(limits.max_process_age * 1000) if limits.max_process_age else None
        )
        self.min_retries = limits.max_retry_count or 1

    async def run(self, limit: int) -> list[_Found]:
        """Up to `limit` matches after the cursor, newest first."""
        q = self.query
        if q.state == "old" and self.old_before is None:
            return []  # the check is off for this type: nothing is too old
        if q.correlation_id is not None:
            low = q.correlation_id.encode() + b"\x00"
            members: Any = await self.redis.zrangebylex(
                self.by_correlation, b"[" + low, b"[" + low + b"\xff", 0, CANDIDATES_CAP
            )
            return await self._candidates([m[len(low):] for m in members], limit)
        if q.id_prefix is not None:
            low = f"{self.process_type}-{q.id_prefix}".encode()
            members = await self.redis.zrangebylex(
                self.by_id, b"[" + low, b"[" + low + b"\xff", 0, CANDIDATES_CAP
            )
            return await self._candidates(members, limit)
        if q.state == "stuck":
            stuck = await self._by_score(self.active, "-inf", q.stuck_before)
            overdue = await self._by_score(self.waiting, "-inf", q.overdue_before)
            return await self._candidates(stuck + overdue, limit)
        if q.state == "retrying":
            members = await self._by_score(self.retrying, self.min_retries, "+inf")
            return await self._candidates(members, limit)
        found: list[_Found] = []
        if q.state in (None, "active", "old") and q.finished == (-_FOREVER, _FOREVER):
            top = q.started[1] if self.old_before is None else min(q.started[1], self.old_before)
            found += await self._ordered(self.since, q.started[0], top, limit)
        for outcome, key in self.finished.items():
            if q.state in (None, outcome):
                found += await self._ordered(key, q.finished[0], q.finished[1], limit)
        found.sort(key=_newest_first, reverse=True)
        return found[:limit]

    async def _by_score(self, key: str, low: float | str, high: float | str) -> list[bytes]:
        found: Any = await self.redis.zrangebyscore(key, low, high, start=0, num=CANDIDATES_CAP)
        return list(found)

    async def _candidates(self, members: Sequence[bytes], limit: int) -> list[_Found]:
        """Matches among `members` (not ordered by time), newest first, after the cursor."""
        found: list[_Found] = []
        for at in range(0, len(members), _BATCH):
            found += await self._matches(members[at : at + _BATCH])
        found.sort(key=_newest_first, reverse=True)
        return found[:limit]

    async def _ordered(self, key: str, low: int, high: int, limit: int) -> list[_Found]:
        """Matches of sorted set `key`, scored by the time search orders by, newest first."""
        if self.after is not None:
            high = min(high, self.after[0])
        found: list[_Found] = []
        offset = 0
        while len(found) < limit:
            batch: Any = await self.redis.zrevrangebyscore(
                key, high, low, start=offset, num=_BATCH
            )
            found += await self._matches(batch)
            offset += len(batch)
            if len(batch) < _BATCH:
                break
        return found[:limit]

    async def _matches(self, members: Sequence[bytes]) -> list[_Found]:
        """The rows of `members` that pass every filter and come after the cursor."""
        if not members:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.records, list(members))
            for member in members:
                for key in (self.active, self.waiting, self.since, *self.finished.values()):
                    pipe.zscore(key, member)
            replies = await pipe.execute()
        records, scores = replies[0], replies[1:]
        found = []
        width = 3 + len(FINISHED_OUTCOMES)
        for i, (member, blob) in enumerate(zip(members, records, strict=True)):
            progress, due, since, *ends = scores[width * i : width * (i + 1)]
            match = self._match(
                member.decode(), decode_process_record(blob), progress, due, since,
                dict(zip(FINISHED_OUTCOMES, ends, strict=True)),
            )
            if match is not None:
                found.append(match)
        return found

    def _match(
        self,
        stream_id: str,
        record: dict[str, Any],
        progress: float | None,
        due: float | None,
        since: float | None,
        ends: dict[str, float | None],
    ) -> _Found | None:
        q = self.query
        started = record.get("s", since)
        outcome, ended = next(((o, e) for o, e in ends.items() if e is not None), (None, None))
        if outcome is not None:
            state = outcome
        elif progress is not None:
            state = "stuck" if progress <= q.stuck_before else "active"
        elif due is not None:
            state = "stuck" if due <= q.overdue_before else "waiting"
        else:
            return None  # no longer indexed (finished and forgotten meanwhile)
        finished = state in FINISHED_OUTCOMES
        retries = 0 if finished else int(record.get("n") or 0)
        wanted = {
            None: True,
            "active": not finished,
            "stuck": state == "stuck",
            "old": not finished and started is not None and self.old_before is not None
            and started <= self.old_before,
            "retrying": not finished and retries >= self.min_retries,
        }.get(q.state, state == q.state)
        if not wanted or (q.correlation_id is not None and record.get("c") != q.correlation_id):
            return None
        if q.id_prefix is not None and not stream_id.startswith(
            f"{self.process_type}-{q.id_prefix}"
        ):
            return None
        if not _within(started, q.started) or not _within(ended, q.finished):
            return None
        at_ms = int(ended if ended is not None else started or 0)
        if self.after is not None and (at_ms, stream_id) >= self.after:
            return None
        row = SearchRow(
            stream_id,
            self.process_type,
            state,
            None if started is None else _time(started),
            None if ended is None else _time(ended),
            record.get("c"),
            record.get("r") if retries else None,
            retries,
        )
        return _Found(at_ms, row)


def _within(value: float | None, bounds: tuple[int, int]) -> bool:
    if bounds == (-_FOREVER, _FOREVER):
        return True
    return value is not None and bounds[0] <= value <= bounds[1]
