"""The command executor: read, fold, decide, write atomically, retry on conflict."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec

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
        interceptors: Interceptors | Sequence[Interceptor] = NO_INTERCEPTORS,
    ) -> None:
        self.store = store
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
        if not isinstance(command, Command) and not isinstance(command, Executable):
            raise ValidationError(f"expected a Command, got {type(command).__name__}")
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
            metadata=metadata,
        )
        return ExecutionResult(result.versions, result.events, attempt)
