"""Runs process steps: for events (through the worker), timeouts, and explicit calls."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from rsaga.clock import Clock, SystemClock
from rsaga.commands import StreamId
from rsaga.defaults import DEFAULT_PROCESS_RETENTION
from rsaga.errors import DomainError, InvalidStreamId, UnknownEventType
from rsaga.events import EventRegistry, RecordedEvent, new_id
from rsaga.executor import Executor
from rsaga.interceptors import StepInput
from rsaga.process.api import (
    RUNAWAY,
    AdvanceTrigger,
    DefinitionError,
    EventTrigger,
    OperatorAction,
    ProcessInfo,
    ProcessManager,
    RejectedTrigger,
    StartTrigger,
    SucceededTrigger,
    TimeoutTrigger,
    Trigger,
    UnknownProcessType,
)
from rsaga.process.engine import ProcessStep
from rsaga.process.events import (
    FRAMEWORK_EVENTS,
    CommandsIssued,
    ProcessCompensated,
    ProcessCompleted,
    ProcessFailed,
    ProcessStarted,
    TimeoutFired,
    TimeoutScheduled,
)
from rsaga.process.registry import CommandRegistry
from rsaga.process.timeouts import TimeoutPayload
from rsaga.runtime.liveness import redis_down

log = logging.getLogger("rsaga.process")


class ProcessRunner:
    """Runs process steps: for events (through the worker), timeouts, and explicit calls."""

    def __init__(
        self,
        executor: Executor,
        managers: Sequence[ProcessManager[Any]],
        *,
        clock: Clock | None = None,
        retention: float | None = DEFAULT_PROCESS_RETENTION,
    ) -> None:
        self.executor = executor
        self.clock: Clock = clock or SystemClock()
        self.managers = {m.name: m for m in managers}
        self.retention = retention
        """`processes.retention`: for the process types that do not set their own."""
        self._step = executor.interceptors.process_step(self._run_step)
        self.commands = CommandRegistry()
        registry: EventRegistry = executor.store.registry
        registry.register(*FRAMEWORK_EVENTS)
        for manager in managers:
            type(manager).validate()
            registry.register(*manager.events, *manager.state_events, *manager.decodes)
            for command in manager.commands:
                registry.register(*command.emits)
            self.commands.register(*manager.commands)

    def manager(self, process_type: str) -> ProcessManager[Any]:
        """The installed manager of `process_type`; `UnknownProcessType` if none."""
        try:
            return self.managers[process_type]
        except KeyError:
            raise UnknownProcessType(
                f"no process manager named {process_type!r} is installed here "
                f"(installed: {', '.join(sorted(self.managers)) or 'none'})"
            ) from None

    def retention_ms(self, manager: ProcessManager[Any]) -> int | None:
        """How long (ms) a finished process of `manager`'s type is kept; None: for ever."""
        retention = manager.retention
        if retention == "setting":
            retention = self.retention
        return None if retention is None else round(retention * 1000)

    async def on_event(
        self, manager: ProcessManager[Any], event: RecordedEvent, *, attempt: int | None = None
    ) -> None:
        """Apply `event` to the process it correlates to, if any.

        `attempt` is the worker's attempt at this trigger (None: not from a worker);
        see `step`.
        """
        process_id = self.correlate(manager, event)
        if process_id is None or event.stream_id == manager.stream_id(process_id):
            return  # not for a process, or the process's own event (no echo)
        await self.step(
            manager,
            process_id,
            EventTrigger(event),
            key=f"{manager.name}:event:{event.event_id}",
            correlation_id=event.correlation_id,
            causation_id=event.event_id,
            attempt=attempt,
        )

    @staticmethod
    def correlate(manager: ProcessManager[Any], event: RecordedEvent) -> str | None:
        """`manager.correlate(event)`, checked: None or a usable process id.

        Anything else, and a `DomainError` or `InvalidStreamId` it raises, is a
        `DefinitionError` naming the process type and the event.
        """
        where = f"process {manager.name}: correlate() of {event.type} {event.event_id}"
        try:
            process_id = manager.correlate(event)
            if process_id is None:
                return None
            if not isinstance(process_id, str):
                raise DefinitionError(
                    f"{where} returned {type(process_id).__name__} {process_id!r}; "
                    "expected None or a process id (str)"
                )
            manager.stream_id(process_id)
        except (DomainError, InvalidStreamId) as exc:
            raise DefinitionError(f"{where} failed: {exc}") from exc
        return process_id

    async def on_timeout(
        self, payload: TimeoutPayload, *, attempt: int | None = None
    ) -> list[RecordedEvent]:
        """Apply a due timeout (discarded if its process moved on); the events written."""
        manager = self.manager(payload.process_type)
        return await self.step(
            manager,
            payload.process_id,
            TimeoutTrigger(payload.name, payload.attempt, payload.due_ms, payload.token),
            key=f"{manager.name}:timeout:{payload.token}",
            correlation_id=payload.correlation_id,
            causation_id=payload.token,
            attempt=attempt,
        )

    async def start(self, process_type: str, process_id: str, data: Any = None) -> None:
        """Start a process explicitly; starting the same id again does nothing more."""
        manager = self.manager(process_type)
        await self.step(
            manager, process_id, StartTrigger(data), key=f"{process_type}:start:{process_id}"
        )

    async def advance(
        self, process_type: str, process_id: str, data: Any = None, *, key: str | None = None
    ) -> None:
        """Nudge a process with `data`; a repeated `key` applies once."""
        manager = self.manager(process_type)
        await self.step(
            manager,
            process_id,
            AdvanceTrigger(data),
            key=key or f"{process_type}:advance:{new_id()}",
        )

    def fold(
        self, manager: ProcessManager[Any], process_id: str, events: Sequence[RecordedEvent]
    ) -> tuple[ProcessInfo, Any]:
        """What the process's `events` fold to: rsaga's `ProcessInfo` and the user's state."""
        step = ProcessStep(
            stream=StreamId(manager.stream_id(process_id)), manager=manager,
            process_id=process_id, trigger=None, now_ms=self.clock.now_ms(),
            commands=self.commands, events=self.executor.store.registry, correlation_id="",
        )
        loaded = step.initial_state()
        for event in events:
            loaded = step.apply(loaded, event)
        return loaded.info, loaded.state

    async def step(
        self,
        manager: ProcessManager[Any],
        process_id: str,
        trigger: Trigger | OperatorAction,
        *,
        key: str,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        attempt: int | None = None,
    ) -> list[RecordedEvent]:
        """Run one step (see the module docstring), then the commands it issued.

        A confirmed command (`Decision.confirm`) that raises something other than
        a `DomainError` propagates, so the worker retries the trigger, until
        `attempt` is the last `handler_retry` allows: then the command is
        rejected (a `RejectedTrigger` step) instead of dead-lettering the trigger.
        The step goes through the `process_step` interceptors; it returns the
        events it wrote (none when it changed nothing or had run before).
        """
        return await self._step(
            StepInput(
                manager, process_id, trigger, key, correlation_id, causation_id, attempt
            )
        )

    async def _run_step(self, call: StepInput) -> list[RecordedEvent]:
        manager, process_id, trigger, key = call.manager, call.process_id, call.trigger, call.key
        causation_id, attempt = call.causation_id, call.attempt
        stream = StreamId(manager.stream_id(process_id))
        correlation_id = call.correlation_id or new_id()
        step = ProcessStep(
            stream=stream,
            manager=manager,
            process_id=process_id,
            trigger=trigger,
            now_ms=self.clock.now_ms(),
            commands=self.commands,
            events=self.executor.store.registry,
            correlation_id=correlation_id,
            metadata=call.metadata,
            retention_ms=self.retention_ms(manager),
        )
        result = await self.executor.execute(
            step, correlation_id=correlation_id, causation_id=causation_id, idempotency_key=key,
            metadata=call.metadata,
        )
        if not result.duplicate:
            self._observe(manager, trigger, result.events)
        if step.seen.removed and not result.events:
            log.info(
                "ignored %s for process %s: it finished and was removed (retention)",
                type(trigger).__name__, stream,
            )
            self.executor.observer.process_transition(manager.name, "late_trigger", 0)
        events = result.events
        if result.duplicate:
            events = [
                e for e in (await self.executor.store.read(stream)).events if e.command_id == key
            ]
        correlation = events[0].correlation_id if events else correlation_id
        for event in events:
            if isinstance(event.data, CommandsIssued):
                await self._run_commands(
                    manager, process_id, event.data, key, correlation, attempt
                )
        return [] if result.duplicate else result.events

    def _observe(
        self,
        manager: ProcessManager[Any],
        trigger: Trigger | OperatorAction,
        events: list[RecordedEvent],
    ) -> None:
        observer = self.executor.observer
        process_type = manager.name
        if isinstance(trigger, TimeoutTrigger) and not events:
            observer.timeout_event(process_type, "discarded")
        for event in events:
            match event.data:
                case ProcessStarted():
                    observer.process_transition(process_type, "start", 0)
                case ProcessCompleted(duration_ms=ms):
                    observer.process_transition(process_type, "complete", ms)
                case ProcessFailed(duration_ms=ms, reason=reason):
                    observer.process_transition(process_type, "fail", ms)
                    if reason.startswith(RUNAWAY):
                        observer.process_transition(process_type, "runaway", ms)
                case ProcessCompensated(duration_ms=ms):
                    observer.process_transition(process_type, "compensate", ms)
                case TimeoutScheduled():
                    observer.timeout_event(process_type, "scheduled")
                case TimeoutFired():
                    pass  # reported by the observer's `fire_timeout`, around the call
                case data:
                    manager.report(data, observer)

    async def _run_commands(
        self,
        manager: ProcessManager[Any],
        process_id: str,
        issued: CommandsIssued,
        key: str,
        correlation_id: str | None,
        attempt: int | None,
    ) -> None:
        for n, stored in enumerate(issued.commands):
            command = self.commands.decode(stored)
            command_key = f"{key}:command:{n}"
            outcome: Trigger
            try:
                await self.executor.execute(
                    command,
                    correlation_id=correlation_id,
                    causation_id=key,
                    idempotency_key=command_key,
                )
            except DomainError as exc:
                outcome = RejectedTrigger(command, str(exc))
            except UnknownEventType as exc:
                name = type(command).__name__
                raise UnknownEventType(
                    f"process {manager.name} issued {name}, which wrote or read an event "
                    f"whose type is not registered ({str(exc).split(';')[0]}): list the event "
                    f"types {name} writes in {name}.emits, and those it only reads in "
                    f"{type(manager).__name__}.decodes; then replay the dead letter"
                ) from exc
            except Exception as exc:
                last = attempt is not None and manager.handler_retry.delay(attempt) is None
                if not (issued.confirm and last) or redis_down(exc):
                    raise
                outcome = RejectedTrigger(command, f"failed {attempt} times: {exc!r}")
            else:
                if not issued.confirm:
                    continue
                outcome = SucceededTrigger(command)
            suffix = "succeeded" if isinstance(outcome, SucceededTrigger) else "rejected"
            await self.step(
                manager,
                process_id,
                outcome,
                key=f"{command_key}:{suffix}",
                correlation_id=correlation_id,
                causation_id=key,
                attempt=attempt,
            )
