"""The command executor: read, fold, decide, write atomically, retry on conflict."""

from __future__ import annotations

import random
import time
from typing import Any

import anyio
import msgspec

from rsaga.commands import Command, Executable, WritePlan
from rsaga.defaults import DEFAULT_COMMAND_RETRY as DEFAULT_COMMAND_RETRY
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
from rsaga.retry import RetryPolicy
from rsaga.store import EventStore, StreamSlice, StreamWrite

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
    ) -> None:
        self.store = store
        self.retry = retry
        self.observer = observer
        self._rng = rng or random.Random()

    async def execute(
        self,
        command: Executable[Any],
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
        if not isinstance(command, Command) and not isinstance(command, Executable):
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
        command: Executable[Any],
        correlation: str,
        causation: str | None,
        key: str | None,
        attempt: int,
    ) -> ExecutionResult:
        state = command.initial_state()
        slices: dict[str, StreamSlice] = {}
        new = list(dict.fromkeys(validate_stream_id(s) for s in command.read_streams()))
        rounds = 0
        while new:
            rounds += 1
            if rounds > MAX_RESOLVE_ROUNDS:
                raise ValidationError(
                    f"{type(command).__name__}.more_streams kept asking for new streams "
                    f"after {MAX_RESOLVE_ROUNDS} rounds"
                )
            read = await self.store.read_streams(new)
            for stream_id in new:
                for event in read[stream_id].events:
                    if key is not None and event.command_id == key:
                        slices.update(read)
                        versions = {s: sl.version for s, sl in slices.items()}
                        return ExecutionResult(versions, [], attempt, duplicate=True)
                    state = command.apply(state, event)
            slices.update(read)
            more = (validate_stream_id(s) for s in command.more_streams(state))
            new = [s for s in dict.fromkeys(more) if s not in slices]

        decided = command.handle(state)
        effects = None
        if isinstance(decided, WritePlan):
            writes, effects = decided.writes, decided.effects
        else:
            writes = decided
        undeclared = [s for s in writes if s not in slices]
        if undeclared:
            raise UndeclaredStream(
                f"{type(command).__name__} wrote to {', '.join(map(repr, undeclared))}, "
                "which it did not declare as read"
            )
        if not any(writes.values()) and effects is None:
            return ExecutionResult({s: sl.version for s, sl in slices.items()}, [], attempt)
        result = await self.store.commit(
            [StreamWrite(s, sl.version, writes.get(s, ())) for s, sl in slices.items()],
            correlation_id=correlation,
            causation_id=causation,
            command_id=key,
            effects=effects,
        )
        return ExecutionResult(result.versions, result.events, attempt)
