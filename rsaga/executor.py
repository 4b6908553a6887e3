"""The command executor: read, fold, decide, write atomically, retry on conflict."""

from __future__ import annotations

import random
import time
from typing import Any

import anyio
import msgspec

from rsaga.commands import Command, WritePlan
from rsaga.errors import (
    ConcurrencyConflict,
    DomainError,
    RetriesExhausted,
    UndeclaredStream,
    ValidationError,
)
from rsaga.events import RecordedEvent, new_id
from rsaga.keyspace import validate_stream_id
from rsaga.observe import NO_OBSERVER, Observer
from rsaga.retry import ExponentialBackoff, RetryPolicy
from rsaga.snapshots import decode_snapshot, encode_snapshot
from rsaga.statecache import DEFAULT_STATE_CACHE_SIZE, CachedFold, StateCache, clone
from rsaga.store import CommitResult, Effects, EventStore, SnapshotWrite, StreamWrite

DEFAULT_COMMAND_RETRY: RetryPolicy = ExponentialBackoff(
    base=0.002, cap=0.25, max_retries=25, jitter=1.0
)
"""Conflicts resolve fast under contention: short, fully jittered delays."""

MAX_RESOLVE_ROUNDS = 16


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
    ) -> None:
        """`state_cache_size`: folded states kept between commands (0: none, fold anew)."""
        self.store = store
        self.cache = StateCache(state_cache_size) if state_cache_size else None
        self.retry = retry
        self.observer = observer
        self._rng = rng or random.Random()

    async def execute(
        self,
        command: Command[Any],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> ExecutionResult:
        """Execute `command` and return what it wrote.

        Domain errors raised by `handle` propagate at once. A version conflict
        re-reads every stream and decides again, until the retry policy gives up
        with `RetriesExhausted`.

        With an `idempotency_key`, the events written carry it, and an execution
        that finds an event with the same key in the streams it read writes
        nothing and returns ``duplicate=True``: re-running a command after a crash
        or a redelivery applies its effect once.
        """
        if not isinstance(command, Command):
            raise ValidationError(f"expected a Command, got {type(command).__name__}")
        correlation = correlation_id or new_id()
        name = command.metric_label()
        started = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._attempt(
                    command, correlation, causation_id, idempotency_key, attempt
                )
            except ConcurrencyConflict as conflict:
                delay = self.retry.delay(attempt, self._rng)
                if delay is None:
                    self.observer.command_executed(
                        name, seconds=time.perf_counter() - started, attempts=attempt,
                        outcome="gave up",
                    )
                    raise RetriesExhausted(attempt, conflict) from conflict
                await anyio.sleep(delay)
            except DomainError:
                self.observer.command_executed(
                    name, seconds=time.perf_counter() - started, attempts=attempt,
                    outcome="refused",
                )
                raise
            else:
                outcome = (
                    "duplicate" if result.duplicate else "written" if result.events
                    else "unchanged"
                )
                self.observer.command_executed(
                    name, seconds=time.perf_counter() - started, attempts=attempt,
                    outcome=outcome,
                )
                return result

    async def _attempt(
        self,
        command: Command[Any],
        correlation: str,
        causation: str | None,
        key: str | None,
        attempt: int,
    ) -> ExecutionResult:
        cache = self.cache if command.cache_state else None
        fold_key = command.fold_key() if cache is not None else None
        base = cache.take(fold_key) if cache is not None else None
        fold = _Fold(command, base, cached=cache is not None)
        try:
            if base is not None and key is not None and key in base.keys:
                return ExecutionResult(dict(fold.versions), [], attempt, duplicate=True)
            unsure = None
            if base is not None and attempt == 1:
                # Decide on the cached state unread: if it is stale, the commit conflicts.
                # Refusing or writing nothing needs fresh state: that outcome stands only
                # if the read finds nothing new (else it is decided again, as on a conflict).
                written = await self._decide(
                    command, fold, correlation, causation, key, final=False
                )
                if isinstance(written, CommitResult):
                    return ExecutionResult(written.versions, written.events, attempt)
                unsure = written
            seen = dict(fold.versions)
            if await self._read(command, fold, key):
                return ExecutionResult(dict(fold.versions), [], attempt, duplicate=True)
            if unsure is not None and unsure.decided and fold.versions == seen:
                if unsure.refusal is not None:
                    raise unsure.refusal
                return ExecutionResult(seen, [], attempt)
            written = await self._decide(command, fold, correlation, causation, key, final=True)
            assert isinstance(written, CommitResult)
            return ExecutionResult(written.versions, written.events, attempt)
        finally:
            if cache is not None and fold.whole:
                cache.put(
                    fold_key, CachedFold(fold.versions, fold.state, fold.keys, fold.snapshot)
                )

    async def _read(self, command: Command[Any], fold: _Fold, key: str | None) -> bool:
        """Read what `fold` lacks and fold it (streams `more_streams` asks for too).

        True if an event carries the idempotency `key` (a duplicate). A stream now
        shorter than folded (deleted) makes the whole fold start again from version 1.
        """
        declared = [validate_stream_id(s) for s in command.read_streams()]
        if not fold.versions and len(declared) == 1:
            await self._from_snapshot(command, fold, declared[0])
            if key is not None and key in fold.keys:
                return True
        new = list(dict.fromkeys([*declared, *fold.versions]))
        rounds = 0
        while new:
            rounds += 1
            if rounds > MAX_RESOLVE_ROUNDS:
                raise ValidationError(
                    f"{type(command).__name__}.more_streams kept asking for new streams "
                    f"after {MAX_RESOLVE_ROUNDS} rounds"
                )
            froms = {s: fold.versions.get(s, 0) + 1 for s in new}
            read = await self.store.read_streams(new, from_versions=froms)
            if any(read[s].version < froms[s] - 1 for s in new):
                # Deleted (or a snapshot ahead of its stream): fold again from version 1.
                fold.restart()
                new = list(dict.fromkeys(validate_stream_id(s) for s in command.read_streams()))
                continue
            fold.whole = False
            for stream_id in new:
                for event in read[stream_id].events:
                    if event.command_id is not None:
                        if event.command_id == key:
                            return True
                        fold.keys.add(event.command_id)
                    fold.state = command.apply(fold.state, event)
                fold.versions[stream_id] = read[stream_id].version
            fold.whole = True
            more = (validate_stream_id(s) for s in command.more_streams(fold.state))
            new = [s for s in dict.fromkeys(more) if s not in fold.versions]
        return False

    async def _from_snapshot(self, command: Command[Any], fold: _Fold, stream_id: str) -> None:
        """Start `fold` from the stream's snapshot, if it has one of this fold's state type."""
        spec = command.snapshot_spec()
        if spec is None:
            return
        blob = await self.store.read_snapshot(stream_id, spec.name)
        found = decode_snapshot(blob, spec.fingerprint(), spec.state_type)
        if found is None:
            return
        version, data, keys = found
        fold.state = command.from_snapshot(data)
        fold.versions[stream_id] = fold.snapshot = version
        fold.keys = keys

    def _snapshot_due(self, command: Command[Any], fold: _Fold) -> SnapshotWrite | None:
        """A snapshot of the folded state to write with the commit, if one is due."""
        spec = command.snapshot_spec()
        if spec is None or len(fold.versions) != 1:
            return None
        [(stream_id, version)] = fold.versions.items()
        if version - fold.snapshot < spec.every:
            return None
        blob = encode_snapshot(
            version, spec.fingerprint(), command.to_snapshot(fold.state), fold.keys
        )
        return SnapshotWrite(stream_id, spec.name, blob)

    async def _decide(
        self,
        command: Command[Any],
        fold: _Fold,
        correlation: str,
        causation: str | None,
        key: str | None,
        *,
        final: bool,
    ) -> CommitResult | _Unsure:
        """`handle` on a copy of the folded state, then commit what it decided.

        Not `final` (the state was not read in this attempt): `_Unsure` instead of
        refusing or writing nothing, or if `more_streams` asks for streams not read.
        """
        snapshot = self._snapshot_due(command, fold)
        state = command.resume(clone(fold.state)) if fold.cached else fold.state
        if not final and any(
            validate_stream_id(s) not in fold.versions for s in command.more_streams(state)
        ):
            return _Unsure(decided=False)
        try:
            decided = command.handle(state)
        except DomainError as refusal:
            if final:
                raise
            return _Unsure(decided=True, refusal=refusal)
        effects = None
        if isinstance(decided, WritePlan):
            writes, effects = decided.writes, decided.effects
        else:
            writes = decided
        undeclared = [s for s in writes if s not in fold.versions]
        if undeclared:
            raise UndeclaredStream(
                f"{type(command).__name__} wrote to {', '.join(map(repr, undeclared))}, "
                "which it did not declare as read"
            )
        if not any(writes.values()) and effects is None:
            return CommitResult(dict(fold.versions), []) if final else _Unsure(decided=True)
        if snapshot is not None:
            effects = msgspec.structs.replace(effects or Effects(), snapshots=[snapshot])
        result = await self.store.commit(
            [StreamWrite(s, v, writes.get(s, ())) for s, v in fold.versions.items()],
            correlation_id=correlation,
            causation_id=causation,
            command_id=key,
            effects=effects,
        )
        if snapshot is not None:
            fold.snapshot = fold.versions[snapshot.stream_id]
        if fold.cached:
            fold.advance(result, key)
        return result


class _Unsure(msgspec.Struct, frozen=True):
    """`handle` on unread cached state did not write: refused, wrote nothing, or did not
    decide (`decided` False: it asked for streams not read)."""

    decided: bool
    refusal: DomainError | None = None


class _Fold:
    """The state one attempt folds, at the versions it folded, and the keys it saw."""

    def __init__(self, command: Command[Any], base: CachedFold | None, *, cached: bool) -> None:
        self.command = command
        self.cached = cached
        """The state outlives the attempt: `handle` gets a copy, commits are folded in."""
        if base is None:
            self.restart()
        else:
            self.state: Any = base.state
            self.versions: dict[str, int] = base.versions
            self.keys: set[str] = base.keys
            self.snapshot = base.snapshot
            """Version of the latest snapshot known to be stored (0: none)."""
            self.whole = True
            """False while events are being folded: a half-folded state is not kept."""

    def restart(self) -> None:
        """Start from nothing: the initial state, no stream read."""
        self.state = self.command.initial_state()
        self.versions = {}
        self.keys = set()
        self.snapshot = 0
        self.whole = True

    def advance(self, result: CommitResult, key: str | None) -> None:
        """Fold the events a commit wrote: the state at the versions after it."""
        self.whole = False
        for event in result.events:
            self.state = self.command.apply(self.state, event)
        if key is not None:
            self.keys.add(key)
        self.versions.update(result.versions)
        self.whole = True
