"""The event store: paged, pipelined reads and atomic versioned multi-stream writes.

Layout in Redis (see `Keyspace`): one Redis Stream per stream id whose entry ids
are ``<version>-0`` and whose only field ``d`` is the event envelope; and one log
stream per shard that receives every committed event in commit order, with
fields ``s`` (stream id), ``v`` (version), ``t`` (event type, so consumer groups
can skip unwanted types inside Redis) and ``d`` (envelope).
"""

from __future__ import annotations

import enum
from collections.abc import Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rsaga.clock import Clock, SystemClock
from rsaga.cluster import client_options, ensure_shard_count, is_cluster, run_replicated
from rsaga.defaults import DEFAULT_DEAD_LETTER_MAX_LEN, DURABILITIES
from rsaga.defaults import DEFAULT_PAGE_SIZE as DEFAULT_PAGE_SIZE
from rsaga.errors import (
    ConcurrencyConflict,
    ConfigError,
    EventDecodeError,
    NotReplicated,
    RedisUnavailable,
    ScriptError,
    StreamRemoved,
    ValidationError,
)
from rsaga.events import DEFAULT_MAX_EVENT_BYTES, EventCodec, EventRegistry, RecordedEvent, new_id
from rsaga.keyspace import Keyspace, validate_stream_id
from rsaga.records import TYPE, LogRecord
from rsaga.scripts import CommitStream, EncodableArg, Scripts, SideEffect


class ExpectedVersion(enum.IntEnum):
    """Special expected versions; a plain int N >= 1 means "exactly N"."""

    ANY = -1
    """No check: append at whatever version the stream has."""
    NO_STREAM = 0
    """The stream must not exist yet."""


Expected = int | ExpectedVersion


def _expected_text(expected: int) -> str:
    if expected == ExpectedVersion.ANY:
        return "any"
    if expected == ExpectedVersion.NO_STREAM:
        return "no stream"
    return str(expected)


class StreamWrite(msgspec.Struct, frozen=True):
    """One stream's part of an atomic write: its expected version and new events.

    A write with no events is a pure check: the stream was read and must not have
    changed.
    """

    stream_id: str
    expected: int
    events: Sequence[msgspec.Struct] = ()


class TimeoutWrite(msgspec.Struct, frozen=True):
    """A timeout to schedule in the same atomic write (replaces one with the same id)."""

    timeout_id: str
    due_ms: int
    payload: bytes


class SideEffectSource(Protocol):
    """Something a commit applies atomically that the store does not interpret (the
    process index, see `rsaga.process.index`): it says which extension of
    ``commit.lua`` to call, with which keys of the commit's shard and which args."""

    def side_effect(self, keyspace: Keyspace, shard: int) -> SideEffect:
        """The extension call for a commit in `shard`."""
        ...


class SnapshotWrite(msgspec.Struct, frozen=True):
    """A snapshot to store in the same atomic write (see `rsaga.snapshots`)."""

    stream_id: str
    fold: str
    version: int
    """The version the write checks for `stream_id`: the check makes it true."""
    blob: bytes


class Effects(msgspec.Struct, frozen=True):
    """What an atomic write does besides appending events."""

    schedule: Sequence[TimeoutWrite] = ()
    cancel: Sequence[str] = ()
    side_effects: Sequence[SideEffectSource] = ()
    """Extensions of the commit, applied in the same atomic step (see `SideEffectSource`)."""
    index: Sequence[SideEffectSource] = ()
    """The same as `side_effects` (the name process-index updates were passed under)."""
    dead_letters: Sequence[Mapping[str, EncodableArg]] = ()
    """Failures to report to an operator, as dead-letter fields."""
    snapshots: Sequence[SnapshotWrite] = ()


class CommitResult(msgspec.Struct, frozen=True):
    """What one atomic write did: each stream's version afterwards and the new events."""

    versions: dict[str, int]
    events: list[RecordedEvent]


def is_tombstone_error(exc: ResponseError) -> bool:
    """Whether a stream command failed on a removed process's tombstone: a string key in
    the stream's place (``remove_expired.lua``), which reads as one event at version 1."""
    return str(exc).startswith("WRONGTYPE")


class StreamSlice(msgspec.Struct, frozen=True):
    """The events of one stream read from some version on, and its current version."""

    stream_id: str
    version: int
    events: list[RecordedEvent]
    snapshot: bytes | None = None
    """With `read_streams(snapshots=...)`: the stored snapshot the events follow (they
    start after its version), undecoded."""


class LogEntry(msgspec.Struct, frozen=True):
    """One entry of a shard log: its Redis entry id and the event it carries."""

    log_id: str
    event: RecordedEvent


def describe_redis(redis: Redis) -> str:
    """Where `redis` points, for messages: never includes a password."""
    kwargs = client_options(redis)
    if is_cluster(redis):
        nodes = redis.get_nodes() or redis.startup_nodes  # type: ignore[attr-defined]
        return "Redis Cluster " + ",".join(node.name for node in nodes)
    if "path" in kwargs:
        where = f"unix://{kwargs['path']}"
    elif "host" in kwargs:
        scheme = "rediss" if "ssl_cert_reqs" in kwargs or "ssl" in kwargs else "redis"
        user = f"{kwargs['username']}@" if kwargs.get("username") else ""
        where = f"{scheme}://{user}{kwargs['host']}:{kwargs.get('port', 6379)}"
    else:
        return "embedded fakeredis"
    return f"{where}/{kwargs.get('db', 0)}"


class EventStore:
    """Reads and atomically writes event streams in Redis.

    `redis` must be a `redis.asyncio.Redis` client with ``decode_responses=False``
    (or a `RedisCluster`, see `rsaga.connection.connect`).

    `durability` "replicated" makes every commit wait until `replicas` replicas
    have it, for at most `replication_timeout` seconds, else raise `NotReplicated`
    (the commit is then on the master only). The first commit stores the shard
    count in Redis, or refuses to go on (`ConfigError`) if Redis holds another one.
    """

    def __init__(
        self,
        redis: Redis,
        registry: EventRegistry,
        *,
        keyspace: Keyspace | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        page_size: int = DEFAULT_PAGE_SIZE,
        clock: Clock | None = None,
        durability: str = "async",
        replicas: int = 1,
        replication_timeout: float = 1.0,
        dead_letter_max_len: int = DEFAULT_DEAD_LETTER_MAX_LEN,
    ) -> None:
        if client_options(redis).get("decode_responses"):
            raise ConfigError("the Redis client must have decode_responses=False")
        if page_size < 1:
            raise ValidationError(f"page_size must be >= 1, got {page_size}")
        if max_event_bytes < 1:
            raise ValidationError(f"max_event_bytes must be >= 1, got {max_event_bytes}")
        if durability not in DURABILITIES:
            raise ValidationError(f"durability must be 'async' or 'replicated', got {durability!r}")
        self.redis = redis
        self.registry = registry
        self.keyspace = keyspace or Keyspace()
        self.codec = EventCodec(registry, max_event_bytes=max_event_bytes)
        self.page_size = page_size
        self.dead_letter_max_len = dead_letter_max_len
        """Dead letters a commit keeps per shard (`worker.dead_letter_max_len`, as the
        worker's dead letters)."""
        self.clock: Clock = clock or SystemClock()
        self.durability = durability
        self.replicas = replicas
        self.replication_timeout = replication_timeout
        self._shard_count_checked = False
        self.scripts = Scripts(redis, self.keyspace)

    @contextmanager
    def _talking_to_redis(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise RedisUnavailable(
                f"cannot reach Redis at {describe_redis(self.redis)}: {exc}"
            ) from exc

    # --- reading ------------------------------------------------------------------

    async def read(self, stream_id: str, *, from_version: int = 1) -> StreamSlice:
        """Every event of `stream_id` from `from_version` on, paged internally."""
        return (await self.read_streams([stream_id], from_version=from_version))[stream_id]

    async def read_streams(
        self,
        stream_ids: Sequence[str],
        *,
        from_version: int = 1,
        from_versions: Mapping[str, int] | None = None,
        snapshots: Mapping[str, str] | None = None,
    ) -> dict[str, StreamSlice]:
        """Read several streams: one pipelined round trip per page of the longest stream.

        Each from `from_version`, or from its own version in `from_versions`. A stream
        read from version 1 and named in `snapshots` (stream id -> fold) starts after the
        fold's stored snapshot, if there is one, which its slice carries.
        """
        for stream_id in stream_ids:
            validate_stream_id(stream_id)
        ids = list(dict.fromkeys(stream_ids))
        starts = dict.fromkeys(ids, from_version)
        starts.update(from_versions or {})
        if min(starts.values(), default=1) < 1:
            raise ValidationError(f"from_version must be >= 1, got {min(starts.values())}")
        if len({self.keyspace.shard_of(s) for s in ids}) > 1:
            return await self._read_across_shards(ids, starts, snapshots or {})
        events: dict[str, list[RecordedEvent]] = {s: [] for s in ids}
        versions: dict[str, int] = {}
        found: dict[str, bytes] = {}
        next_version = {s: starts[s] for s in ids}
        folds = {s: f for s, f in (snapshots or {}).items() if starts.get(s) == 1}
        pending = ids
        decode = self.codec.decode
        with self._talking_to_redis():
            while pending:
                replies = await self.scripts.read_streams(
                    pending, self.page_size, [next_version[s] for s in pending], folds
                )
                folds = {}  # the first page only: later pages go on from where it ended
                full = []
                for stream_id, flat in zip(pending, replies, strict=True):
                    versions.setdefault(stream_id, int(flat[0]))
                    mine = events[stream_id]
                    start = 1
                    if len(flat) > 1 and int(flat[1]) == 0:
                        found[stream_id] = bytes(flat[2])
                        start = 3
                    for at in range(start, len(flat), 2):
                        blob = flat[at + 1]
                        if blob is None:
                            raise EventDecodeError(
                                f"an entry of stream {stream_id!r} has no 'd' field"
                            )
                        mine.append(decode(stream_id, int(flat[at]), blob))
                    if (len(flat) - start) // 2 == self.page_size:
                        next_version[stream_id] = mine[-1].version + 1
                        full.append(stream_id)
                pending = full
        return {s: StreamSlice(s, versions[s], events[s], found.get(s)) for s in ids}

    async def _read_across_shards(
        self, ids: list[str], starts: dict[str, int], snapshots: Mapping[str, str]
    ) -> dict[str, StreamSlice]:
        """Streams in different shards cannot share a script: read each shard apart."""
        by_shard: dict[int, list[str]] = {}
        for stream_id in ids:
            by_shard.setdefault(self.keyspace.shard_of(stream_id), []).append(stream_id)
        found: dict[str, StreamSlice] = {}
        for group in by_shard.values():
            found.update(
                await self.read_streams(group, from_versions=starts, snapshots=snapshots)
            )
        return {s: found[s] for s in ids}

    async def version(self, stream_id: str) -> int:
        """The current version of `stream_id` (0 if it has no events)."""
        validate_stream_id(stream_id)
        with self._talking_to_redis():
            try:
                return int(await self.redis.xlen(self.keyspace.stream(stream_id)))
            except ResponseError as exc:
                if not is_tombstone_error(exc):
                    raise
                return 1  # a removed process's tombstone (rsaga.process.retention)

    async def read_log(
        self, shard: int = 0, *, after: str = "0-0", count: int = 1000
    ) -> list[LogEntry]:
        """Up to `count` entries of a shard log after the entry id `after`."""
        if not 0 <= shard < self.keyspace.shards:
            raise ValidationError(f"shard must be in 0..{self.keyspace.shards - 1}, got {shard}")
        with self._talking_to_redis():
            page: Any = await self.redis.xrange(
                self.keyspace.log(shard), f"({after}", "+", count=count
            )
        entries = [self.decode_log_entry(entry_id, fields) for entry_id, fields in page]
        return [e for e in entries if e is not None]

    def decode_log_entry(
        self,
        entry_id: bytes | str,
        fields: Mapping[bytes, bytes],
        wanted: Container[str] | None = None,
    ) -> LogEntry | None:
        """Decode one raw log entry, or None if its type is not in `wanted`.

        Raises `EventDecodeError` (missing or malformed fields, corrupt bytes) or
        `UnknownEventType`.
        """
        log_id = entry_id.decode(errors="replace") if isinstance(entry_id, bytes) else entry_id
        try:
            record = LogRecord.decode(fields)
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise EventDecodeError(
                f"log entry {log_id} lacks a valid s/v/d field: {exc!r}"
            ) from None
        event = self.codec.decode_wanted(
            record.stream_id, record.version, record.envelope, wanted, fields.get(TYPE)
        )
        return None if event is None else LogEntry(log_id, event)

    # --- writing ------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[msgspec.Struct],
        *,
        expected: Expected = ExpectedVersion.ANY,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> CommitResult:
        """Append `events` to one stream if its version is `expected`."""
        return await self.commit(
            [StreamWrite(stream_id, int(expected), events)],
            correlation_id=correlation_id,
            causation_id=causation_id,
            metadata=metadata,
        )

    async def commit(
        self,
        writes: Sequence[StreamWrite],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        command_id: str | None = None,
        effects: Effects | None = None,
        metadata: dict[str, str] | None = None,
    ) -> CommitResult:
        """Check every write's expected version, then append all events, atomically.

        `effects` (timeouts to schedule or cancel, process-index transitions) are
        applied in the same atomic step, in the shard of the streams. Every event
        carries `metadata` (see `RecordedEvent.metadata`).

        Raises `ConcurrencyConflict` (nothing written) if any stream is not at its
        expected version; validation errors are raised before Redis is touched.
        """
        shard, streams, recorded = self._encode_commit(
            writes, correlation_id, causation_id, command_id, metadata
        )
        with self._talking_to_redis():
            if not self._shard_count_checked:
                await ensure_shard_count(self.redis, self.keyspace)
                self._shard_count_checked = True
            if effects is None:
                call = self.scripts.commit_call(shard, streams)
            else:
                call = self.scripts.commit_call(
                    shard,
                    streams,
                    schedule=[(t.timeout_id, t.due_ms, t.payload) for t in effects.schedule],
                    cancel=effects.cancel,
                    side_effects=[
                        e.side_effect(self.keyspace, shard)
                        for e in (*effects.side_effects, *effects.index)
                    ],
                    dead_letters=effects.dead_letters,
                    dead_letter_max_len=self.dead_letter_max_len,
                    snapshots=[
                        (s.stream_id, s.fold, s.version, s.blob) for s in effects.snapshots
                    ],
                    with_effects=True,
                )
            if self.durability == "replicated":
                timeout_ms = max(1, int(self.replication_timeout * 1000))
                reply, acked = await run_replicated(
                    self.redis, call.script, call.keys, call.args, self.replicas, timeout_ms
                )
            else:
                reply, acked = await call.run(self.redis), self.replicas
        if acked < self.replicas and int(reply[0]) == 0:
            raise NotReplicated(
                f"a commit to {writes[0].stream_id!r} reached its master but {acked} of "
                f"{self.replicas} replicas acknowledged it within {self.replication_timeout:g} s "
                "(store.durability = 'replicated'): a failover now could lose it; retrying "
                "the command is safe"
            )
        return self._commit_result(writes, reply, recorded)

    def _encode_commit(
        self,
        writes: Sequence[StreamWrite],
        correlation_id: str | None,
        causation_id: str | None,
        command_id: str | None,
        metadata: dict[str, str] | None = None,
    ) -> tuple[int, list[CommitStream], list[list[RecordedEvent]]]:
        if not writes:
            raise ValidationError("a commit needs at least one stream")
        stream_ids = [validate_stream_id(w.stream_id) for w in writes]
        if len(set(stream_ids)) != len(stream_ids):
            raise ValidationError("a commit names the same stream twice")
        for w in writes:
            if not isinstance(w.expected, int) or w.expected < -1:
                raise ValidationError(
                    f"expected version of {w.stream_id!r} must be ANY, NO_STREAM or an int >= 1,"
                    f" got {w.expected!r}"
                )
        shard = self.keyspace.shard_of_all(stream_ids)
        now_ms = self.clock.now_ms()
        occurred_at = datetime.fromtimestamp(now_ms / 1000, UTC)
        correlation = correlation_id or new_id()
        streams: list[CommitStream] = []
        recorded: list[list[RecordedEvent]] = []
        for w in writes:
            pairs: list[tuple[str, bytes]] = []
            mine = []
            for event in w.events:
                event_id = new_id()
                type_name = self.registry.name_of(event)
                pairs.append((
                    type_name,
                    self.codec.encode(
                        event,
                        event_id=event_id,
                        occurred_at_ms=now_ms,
                        correlation_id=correlation,
                        causation_id=causation_id,
                        command_id=command_id,
                        metadata=metadata,
                    ),
                ))
                mine.append(
                    RecordedEvent(
                        stream_id=w.stream_id,
                        version=0,
                        event_id=event_id,
                        occurred_at=occurred_at,
                        type=type_name,
                        data=event,
                        correlation_id=correlation,
                        causation_id=causation_id,
                        command_id=command_id,
                        metadata=metadata,
                    )
                )
            streams.append(CommitStream(w.stream_id, int(w.expected), pairs))
            recorded.append(mine)
        return shard, streams, recorded

    def _commit_result(
        self, writes: Sequence[StreamWrite], reply: Any, recorded: list[list[RecordedEvent]]
    ) -> CommitResult:
        code = int(reply[0])
        if code == -1:
            write = writes[int(reply[1]) - 1]
            expected = _expected_text(write.expected)
            raise ConcurrencyConflict(write.stream_id, expected, int(reply[2]))
        if code == -2:
            stream_id = writes[int(reply[1]) - 1].stream_id
            raise StreamRemoved(
                f"stream {stream_id!r} belonged to a process removed after its retention: "
                "it takes no new events"
            )
        if code != 0:
            raise ScriptError(f"commit.lua returned unknown code {code}")
        versions: dict[str, int] = {}
        events: list[RecordedEvent] = []
        for w, final, mine in zip(writes, reply[1:], recorded, strict=True):
            final = int(final)
            versions[w.stream_id] = final
            first = final - len(mine) + 1
            events.extend(
                msgspec.structs.replace(e, version=first + i) for i, e in enumerate(mine)
            )
        return CommitResult(versions, events)
