"""The command executor: read, fold, decide, write atomically, retry on conflict."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Any

import anyio
import msgspec
from redis.exceptions import RedisError

from rsaga.commands import Command, Executable, WritePlan
from rsaga.defaults import DEFAULT_COMMAND_RETRY as DEFAULT_COMMAND_RETRY
from rsaga.errors import (
    ConcurrencyConflict,
    RetriesExhausted,
    UndeclaredStream,
    ValidationError,
)
from rsaga.events import RecordedEvent, new_id
from rsaga.interceptors import (
    NO_INTERCEPTORS,
    CommandInput,
    Interceptor,
    Interceptors,
    Metadata,
)
from rsaga.keyspace import validate_stream_id
from rsaga.observe import NO_OBSERVER, Observer
from rsaga.retry import RetryPolicy, policy_delay
from rsaga.snapshots import SnapshotSpec, decode_snapshot, encode_snapshot
from rsaga.statecache import DEFAULT_STATE_CACHE_SIZE, CachedFold, StateCache, clone
from rsaga.store import CommitResult, Effects, EventStore, SnapshotWrite, StreamWrite

MAX_RESOLVE_ROUNDS = 16
_EXECUTABLE_TYPES: set[type] = set()
"""Types of commands executed before: checked once (`Executable` is a runtime protocol)."""


class ExecutionResult(msgspec.Struct, frozen=True):
    """What executing a command did."""

    versions: dict[str, int]
    """Every stream the command read, at its version after the write."""
    events: list[RecordedEvent]
    """The events written, with their versions."""
    attempts: int
    """1 if the first attempt succeeded; more after version conflicts."""
    duplicate: bool = False
    """True if an earlier execution with the same idempotency key had written already."""


def with_observer(
    interceptors: Interceptors | Sequence[Interceptor], observer: Observer
) -> Interceptors:
    """`interceptors` as a chain, with `observer` outermost (an `Observer` measures calls
    as an interceptor) unless it is the plain no-op one or in the chain already."""
    items = list(interceptors.interceptors if isinstance(interceptors, Interceptors)
                 else interceptors)
    if type(observer) is not Observer and observer not in items:
        items.insert(0, observer)
    if isinstance(interceptors, Interceptors) and len(items) == len(interceptors.interceptors):
        return interceptors
    return Interceptors(items)


class Executor:
    """Executes commands against an `EventStore`, retrying version conflicts."""

    def __init__(
        self,
        store: EventStore,
        *,
        retry: RetryPolicy = DEFAULT_COMMAND_RETRY,
        rng: random.Random | None = None,
        observer: Observer = NO_OBSERVER,
        state_cache_size: int = DEFAULT_STATE_CACHE_SIZE,
        interceptors: Interceptors | Sequence[Interceptor] = NO_INTERCEPTORS,
    ) -> None:
        """`state_cache_size`: folded states kept between commands (0: none, fold anew)."""
        self.store = store
        self.cache = StateCache(state_cache_size) if state_cache_size else None
        self.retry = retry
        self._rng = rng or random.Random()
        self._delay = policy_delay(retry, self._rng)
        self._given = interceptors
        self.observer = observer

    @property
    def observer(self) -> Observer:
        """Receives what the runtime does; measures calls as the outermost interceptor."""
        return self._observer

    @observer.setter
    def observer(self, observer: Observer) -> None:
        # Workers and process runners take their chains from `interceptors` when
        # they are built; commands see a new observer at once.
        self._observer = observer
        self.interceptors = with_observer(self._given, observer)
        self._execute = self.interceptors.execute_command(self._run)

    async def execute(
        self,
        command: Executable[Any],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        idempotency_key: str | None = None,
        metadata: Metadata | None = None,
    ) -> ExecutionResult:
        """Execute `command` and return what it wrote.

        Domain errors raised by `handle` propagate at once. A version conflict
        re-reads every stream and decides again, until the retry policy gives up
        with `RetriesExhausted`.

        With an `idempotency_key`, the events written carry it, and an execution
        that finds an event with the same key in the streams it read writes
        nothing and returns ``duplicate=True``: re-running a command after a crash
        or a redelivery applies its effect once.

        `metadata` is carried by every event written (interceptors may add to it).
        The call goes through the `execute_command` interceptors.
        """
        if type(command) not in _EXECUTABLE_TYPES:
            if not isinstance(command, Command) and not isinstance(command, Executable):
                raise ValidationError(f"expected a Command, got {type(command).__name__}")
            _EXECUTABLE_TYPES.add(type(command))  # a protocol check costs ~50 us a call
        return await self._execute(
            CommandInput(command, correlation_id, causation_id, idempotency_key, metadata)
        )

    async def _run(self, call: CommandInput) -> ExecutionResult:
        correlation = call.correlation_id or new_id()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(
                    call.command, correlation, call.causation_id, call.idempotency_key,
                    attempt, call.metadata,
                )
            except ConcurrencyConflict as conflict:
                delay = self._delay(attempt)
                if delay is None:
                    raise RetriesExhausted(attempt, conflict) from conflict
                await anyio.sleep(delay)

    async def _attempt(
        self,
        command: Executable[Any],
        correlation: str,
        causation: str | None,
        key: str | None,
        attempt: int,
        metadata: Metadata | None,
    ) -> ExecutionResult:
        fold = _Fold(command, self.cache if command.cache_state else None)
        try:
            unsure = None
            # A key the cache has seen is a duplicate only if Redis still has it: a Redis
            # that lost writes in a crash makes the cache ahead of it (the read restarts).
            seen_key = key is not None and fold.has_key(key)
            if fold.from_cache and attempt == 1 and not seen_key:
                # Decide on the cached state unread: if it is stale, the commit conflicts.
                # Raising or writing nothing needs fresh state: that outcome stands only
                # if the read finds nothing new (else it is decided again, as on a conflict).
                written = await self._decide(
                    command, fold, correlation, causation, key, metadata, final=False
                )
                if isinstance(written, CommitResult):
                    return ExecutionResult(written.versions, written.events, attempt)
                unsure = written
            seen = fold.versions()
            if await self._read(command, fold, key):
                return ExecutionResult(fold.versions(), [], attempt, duplicate=True)
            if unsure is not None and unsure.decided and fold.versions() == seen:
                if unsure.refusal is not None:
                    raise unsure.refusal
                return ExecutionResult(seen, [], attempt)
            written = await self._decide(
                command, fold, correlation, causation, key, metadata, final=True
            )
            assert isinstance(written, CommitResult)
            return ExecutionResult(written.versions, written.events, attempt)
        except (RedisError, OSError):
            # Redis may have restarted and lost writes it had acknowledged (an fsync
            # that never came, a failover): the cache could be ahead of it, and a fold
            # ahead of its streams decides on events that do not exist. Start anew.
            if self.cache is not None:
                self.cache.clear()
            raise
        finally:
            fold.keep()

    async def _read(self, command: Executable[Any], fold: _Fold, key: str | None) -> bool:
        """Read what `fold` lacks and fold it (streams `more_streams` asks for too).

        True if an event folded (now or before) carries the idempotency `key` (a
        duplicate). A stream now shorter than folded (deleted, or lost in a Redis
        crash) makes the whole fold start again from version 1.
        """
        declared = fold.declared
        spec = command.snapshot_spec()
        new = list(dict.fromkeys([*declared, *fold.versions()]))
        rounds = 0
        while new:
            rounds += 1
            if rounds > MAX_RESOLVE_ROUNDS:
                raise ValidationError(
                    f"{type(command).__name__}.more_streams kept asking for new streams "
                    f"after {MAX_RESOLVE_ROUNDS} rounds"
                )
            known = fold.versions()
            froms = {s: known.get(s, 0) + 1 for s in new}
            wanted = {}
            if spec is not None:  # the snapshots come with the read: no round trip more
                wanted = {s: spec.name for s in new if froms[s] == 1 and fold.single(s)}
            read = await self.store.read_streams(new, from_versions=froms, snapshots=wanted)
            if any(read[s].version < froms[s] - 1 for s in new):
                # Deleted (or a snapshot ahead of its stream): fold again from version 1.
                fold.restart()
                new = list(dict.fromkeys(declared))
                continue
            again = []
            fold.whole = False
            for stream_id in new:
                part = fold.part(stream_id)
                found = read[stream_id].snapshot
                if found is not None:
                    assert spec is not None
                    if not self._start_from(command, spec, part, stream_id, found):
                        again.append(stream_id)  # of another state type: from version 1
                        continue
                    if key is not None and key in part.keys:
                        return True
                for event in read[stream_id].events:
                    if event.command_id is not None:
                        if event.command_id == key:
                            return True
                        part.keys.add(event.command_id)
                    part.state = command.apply(part.state, event)
                part.versions[stream_id] = read[stream_id].version
            fold.whole = True
            if again:
                spec = None  # a matching snapshot never comes back from a second read
                new = again
                continue
            more = (validate_stream_id(s) for s in command.more_streams(fold.state()))
            new = [s for s in dict.fromkeys(more) if not fold.has_stream(s)]
        return key is not None and fold.has_key(key)

    @staticmethod
    def _start_from(
        command: Executable[Any], spec: SnapshotSpec, part: _Part, stream_id: str, blob: bytes
    ) -> bool:
        """Start `part` from a snapshot read with its stream; False if it does not match."""
        found = decode_snapshot(blob, spec.fingerprint(), spec.state_type)
        if found is None:
            return False
        part.snapshot, data, part.keys = found
        part.state = command.from_snapshot(data)
        part.versions[stream_id] = part.snapshot
        return True

    def _snapshots_due(self, command: Executable[Any], fold: _Fold) -> list[SnapshotWrite]:
        """Snapshots of single-stream parts to write with the commit, where one is due."""
        spec = command.snapshot_spec()
        if spec is None:
            return []
        due = []
        for part in fold.parts():
            if len(part.versions) != 1:
                continue
            [(stream_id, version)] = part.versions.items()
            if version - part.snapshot >= spec.every:
                blob = encode_snapshot(
                    version, spec.fingerprint(), command.to_snapshot(part.state), part.keys
                )
                due.append(SnapshotWrite(stream_id, spec.name, version, blob))
        return due

    async def _decide(
        self,
        command: Executable[Any],
        fold: _Fold,
        correlation: str,
        causation: str | None,
        key: str | None,
        metadata: Metadata | None,
        *,
        final: bool,
    ) -> CommitResult | _Unsure:
        """`handle` on a copy of the folded state, then commit what it decided.

        Not `final` (the state was not read in this attempt): `_Unsure` instead of
        refusing or writing nothing, or if `more_streams` asks for streams not read.
        """
        snapshots = self._snapshots_due(command, fold)
        state = command.resume(clone(fold.state())) if fold.cached else fold.state()
        if not final and any(
            not fold.has_stream(validate_stream_id(s)) for s in command.more_streams(state)
        ):
            return _Unsure(decided=False)
        try:
            decided = command.handle(state)
        except Exception as refusal:
            # Stale state can make user code raise anything: only fresh state decides.
            if final:
                raise
            return _Unsure(decided=True, refusal=refusal)
        effects = None
        if isinstance(decided, WritePlan):
            writes, effects = decided.writes, decided.effects
        else:
            writes = decided
        versions = fold.versions()
        undeclared = [s for s in writes if s not in versions]
        if undeclared:
            raise UndeclaredStream(
                f"{type(command).__name__} wrote to {', '.join(map(repr, undeclared))}, "
                "which it did not declare as read"
            )
        if not any(writes.values()) and effects is None:
            return CommitResult(versions, []) if final else _Unsure(decided=True)
        if snapshots:
            effects = msgspec.structs.replace(effects or Effects(), snapshots=snapshots)
        result = await self.store.commit(
            [StreamWrite(s, v, writes.get(s, ())) for s, v in versions.items()],
            correlation_id=correlation,
            causation_id=causation,
            command_id=key,
            effects=effects,
            metadata=metadata,
        )
        for snapshot in snapshots:
            fold.part(snapshot.stream_id).snapshot = versions[snapshot.stream_id]
        if fold.cached:
            fold.advance(result, key)
        return result


class _Unsure(msgspec.Struct, frozen=True):
    """`handle` on unread cached state did not write: raised (a `DomainError` or any
    other exception), wrote nothing, or did not decide (`decided` False: it asked for
    streams not read)."""

    decided: bool
    refusal: Exception | None = None


class _Part:
    """A state folded from some streams, at the version of each, and the keys it saw:
    what one cache entry holds."""

    def __init__(self, key: Hashable, command: Executable[Any], base: CachedFold | None) -> None:
        self.key = key
        self.command = command
        if base is None:
            self.restart()
        else:
            self.state: Any = base.state
            self.versions: dict[str, int] = base.versions
            self.keys: set[str] = base.keys
            self.snapshot = base.snapshot
            """Version of the latest snapshot known to be stored (0: none)."""

    def restart(self) -> None:
        """Start from nothing: the initial state, no stream read."""
        self.state = self.command.initial_state()
        self.versions = {}
        self.keys = set()
        self.snapshot = 0


class _Fold:
    """What one attempt folds: one part over all its streams, or with `fold_per_stream`
    one part per stream (each cached and snapshotted alone, merged for `handle`)."""

    def __init__(self, command: Executable[Any], cache: StateCache | None) -> None:
        self.command = command
        self.cache = cache
        self.cached = cache is not None
        """The parts outlive the attempt: `handle` gets a copy, commits are folded in."""
        self.split = command.fold_per_stream
        self.whole = True
        """False while events are being folded: a half-folded state is not kept."""
        self.restarted = False
        """The streams were found shorter than folded: what is kept replaces the entry."""
        self.generation = cache.generation if cache is not None else 0
        self.declared = list(dict.fromkeys(validate_stream_id(s) for s in command.read_streams()))
        self._parts: dict[str, _Part] = {}
        if self.split:
            for stream_id in self.declared:
                self.part(stream_id)
        else:
            key = command.fold_key() if cache is not None else None
            base = cache.copy(key) if cache is not None else None
            self._whole_part = _Part(key, command, base)
        # An entry kept by an attempt that failed before reading every stream holds
        # none of some: it cannot be decided on unread.
        self.from_cache = bool(self.declared) and self.covers_declared()

    def part(self, stream_id: str) -> _Part:
        """The part that folds `stream_id` (a new one, split, for a stream not seen yet)."""
        if not self.split:
            return self._whole_part
        found = self._parts.get(stream_id)
        if found is None:
            key = (type(self.command), stream_id)
            base = self.cache.copy(key) if self.cache is not None else None
            found = self._parts[stream_id] = _Part(key, self.command, base)
        return found

    def parts(self) -> list[_Part]:
        """Every part, once."""
        return list(self._parts.values()) if self.split else [self._whole_part]

    def single(self, stream_id: str) -> bool:
        """Whether `stream_id` is folded alone (so it may be snapshotted)."""
        return self.split or len(list(self.command.read_streams())) == 1

    def has_stream(self, stream_id: str) -> bool:
        """Whether `stream_id` has been read (or came from the cache)."""
        return any(stream_id in p.versions for p in self.parts())

    def versions(self) -> dict[str, int]:
        """Each stream folded, at the version folded (a new dict)."""
        if not self.split:
            return dict(self._whole_part.versions)
        return {s: v for p in self._parts.values() for s, v in p.versions.items()}

    def has_key(self, key: str) -> bool:
        """Whether an event folded carries the idempotency `key`."""
        return any(key in p.keys for p in self.parts())

    def state(self) -> Any:
        """The state `handle` decides on."""
        if not self.split:
            return self._whole_part.state
        return self.command.merge({s: p.state for s, p in self._parts.items()})

    def covers_declared(self) -> bool:
        """Whether every declared stream has been folded (read, or from the cache)."""
        return all(self.has_stream(s) for s in self.declared)

    def restart(self) -> None:
        """Start every part from nothing."""
        for part in self.parts():
            part.restart()
        self.whole = True
        self.restarted = True

    def advance(self, result: CommitResult, key: str | None) -> None:
        """Fold the events a commit wrote: the state at the versions after it."""
        self.whole = False
        for event in result.events:
            part = self.part(event.stream_id)
            part.state = self.command.apply(part.state, event)
            if key is not None:
                part.keys.add(key)
        for stream_id, version in result.versions.items():
            self.part(stream_id).versions[stream_id] = version
        self.whole = True

    def keep(self) -> None:
        """Put every part that folded its streams in the cache (none if folding stopped
        halfway, or if the cache was cleared since this fold began)."""
        cache = self.cache
        if cache is None or not self.whole or cache.generation != self.generation:
            return
        if not self.split and not self.covers_declared():
            return
        for part in self.parts():
            if not part.versions:
                continue  # its stream was never read
            cache.put(
                part.key,
                CachedFold(part.versions, part.state, part.keys, part.snapshot),
                replace=self.restarted,
            )
