"""What a subscription runs: one consumer group's decoding and handling of entries,
for an event handler, a process type's event triggers, or its due timeouts."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from rsaga.errors import EventDecodeError, UnknownEventType
from rsaga.events import RecordedEvent
from rsaga.executor import Executor
from rsaga.handlers import EventHandler, HandlerContext
from rsaga.interceptors import HandleInput, TimeoutInput
from rsaga.process.api import (
    DefinitionError,
    IncompatibleDefinition,
    ProcessManager,
    UnknownProcessType,
)
from rsaga.process.registry import UnknownCommandType
from rsaga.process.runner import ProcessRunner
from rsaga.process.timeouts import TimeoutPayload, decode_timeout
from rsaga.records import payload_of
from rsaga.retry import RetryPolicy
from rsaga.runtime.consumer import RawEntry
from rsaga.store import LogEntry

TIMEOUTS_GROUP = "rsaga-timeouts"
"""Prefix of the consumer groups of the due-timeouts streams (one per process type)."""


def timeouts_group(process_type: str) -> str:
    """The consumer group that reads the due timeouts of `process_type`."""
    return f"{TIMEOUTS_GROUP}:{process_type}"


class Source(Protocol):
    """What a subscription runs: decoding and handling entries of one consumer group."""

    name: str
    retry: RetryPolicy
    wanted: set[str] | None
    """Event types to receive (others are acknowledged inside Redis); None: all entries."""

    def decode(self, entry: RawEntry) -> Any | None:
        """The item to handle, or None if the entry is not for this group (acknowledged).

        Raises one of `UNDELIVERABLE` for entries that can never be handled.
        """
        ...

    async def handle(self, item: Any, entry: RawEntry, attempt: int) -> None:
        """Handle one decoded item; raising means retry, then dead letters."""
        ...


class HandlerSource:
    """An `EventHandler` over a shard log."""

    def __init__(self, handler: EventHandler, executor: Executor) -> None:
        self.handler = handler
        self.executor = executor
        self.name = handler.name
        self.retry = type(handler).retry
        self.wanted: set[str] | None = {
            executor.store.registry.name_of_type(t) for t in handler.events
        }
        self._call = executor.interceptors.handle(self._handle)

    def decode(self, entry: RawEntry) -> LogEntry | None:
        # Entries of unwanted types, and replays for other groups, were already
        # acknowledged inside read_batch.lua; `wanted` still covers entries
        # without a type field.
        return self.executor.store.decode_log_entry(entry.log_id, entry.fields, self.wanted)

    async def handle(self, item: LogEntry, entry: RawEntry, attempt: int) -> None:
        await self._call(HandleInput(self.name, item.event, attempt, entry.log_id))

    async def _handle(self, call: HandleInput) -> None:
        ctx = HandlerContext(
            call.event,
            executor=self.executor,
            handler=self.name,
            log_id=call.log_id,
            attempt=call.attempt,
        )
        await self.handler.handle(call.event, ctx)


class ProcessSource:
    """A process manager's event triggers over a shard log."""

    def __init__(self, manager: ProcessManager[Any], runner: ProcessRunner) -> None:
        self.manager = manager
        self.runner = runner
        self.name = manager.name
        self.retry = type(manager).handler_retry
        registry = runner.executor.store.registry
        self.wanted: set[str] | None = {registry.name_of_type(t) for t in manager.events}
        self._call = runner.executor.interceptors.handle(self._handle)

    def decode(self, entry: RawEntry) -> LogEntry | None:
        store = self.runner.executor.store
        return store.decode_log_entry(entry.log_id, entry.fields, self.wanted)

    async def handle(self, item: LogEntry, entry: RawEntry, attempt: int) -> None:
        await self._call(HandleInput(self.name, item.event, attempt, entry.log_id, True))

    async def _handle(self, call: HandleInput) -> None:
        await self.runner.on_event(self.manager, call.event, attempt=call.attempt)


class TimeoutSource:
    """Due timeouts of one process type, over a shard's due stream (entries of other
    types are acknowledged inside Redis: only workers that run a type receive them)."""

    def __init__(self, manager: ProcessManager[Any], runner: ProcessRunner) -> None:
        self.process_type = manager.name
        self.name = timeouts_group(manager.name)
        self.wanted: set[str] | None = {manager.name}
        self.runner = runner
        self.retry: RetryPolicy = type(manager).handler_retry
        self._call = runner.executor.interceptors.fire_timeout(self._fire)

    def decode(self, entry: RawEntry) -> TimeoutPayload | None:
        try:
            payload = decode_timeout(payload_of(entry.fields))
        except (KeyError, msgspec.DecodeError) as exc:
            raise EventDecodeError(
                f"due timeout {entry.log_id} has no valid payload: {exc!r}"
            ) from None
        return payload if payload.process_type == self.process_type else None

    async def handle(self, item: TimeoutPayload, entry: RawEntry, attempt: int) -> None:
        await self._call(TimeoutInput(item, attempt, self.name))

    async def _fire(self, call: TimeoutInput) -> list[RecordedEvent]:
        return await self.runner.on_timeout(call.payload, attempt=call.attempt)


UNDELIVERABLE = (EventDecodeError, UnknownEventType, UnknownProcessType, IncompatibleDefinition,
                 UnknownCommandType, DefinitionError)
"""Errors that mean an entry can never be handled: it goes to dead letters at once."""
