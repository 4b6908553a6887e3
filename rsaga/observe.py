"""Seams for cross-cutting concerns: the runtime reports what happens to an `Observer`.

An `Observer` is an `Interceptor`: what is a call (a command executed, a
handler or a timeout's step that ran) it measures around the call, as an
interceptor, and reports to its hooks; what is not a call (a process's
transitions, timeouts scheduled, discarded or moved, an entry retried or
dead-lettered) the runtime reports to the hooks directly. Every hook is a no-op
here; `rsaga.metrics.PrometheusObserver` implements them for Prometheus. None of
the worker, executor, process runner or scheduler knows about metrics.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rsaga.errors import DomainError, RetriesExhausted
from rsaga.interceptors import (
    CommandInput,
    HandleInput,
    Interceptor,
    Next,
    TimeoutInput,
)

if TYPE_CHECKING:
    from rsaga.events import RecordedEvent
    from rsaga.executor import ExecutionResult

_TIMEOUT_FIRED = "rsaga.TimeoutFired"


class Observer(Interceptor):
    """Receives what the runtime does. Subclass and override what you need."""

    def command_executed(
        self, command: str, *, seconds: float, attempts: int, outcome: str
    ) -> None:
        """A command ran: outcome is "written", "unchanged", "duplicate", "refused" or "gave up"."""

    def entry_handled(self, group: str, *, seconds: float, outcome: str) -> None:
        """A handler finished an entry: "handled", "skipped", "retried" or "dead_lettered"
        (`seconds`: of the attempt that handled it)."""

    def process_transition(self, process_type: str, transition: str, duration_ms: int) -> None:
        """A process step committed a lifecycle transition: "start", "complete", "fail",
        or "compensate" (ended compensated); "runaway" follows the "fail" of a process
        stopped for stepping without outside input; "late_trigger": a trigger was ignored
        because its process finished and was removed (retention)."""

    def timeout_event(self, process_type: str, kind: str, lateness_ms: float = 0.0) -> None:
        """A timeout was "scheduled", "fired" (with its lateness) or "discarded"."""

    def saga_event(self, saga: str, kind: str) -> None:
        """A saga "compensated" a step or a compensation "failed" for good."""

    def timeouts_moved(self, shard: int, moved: int) -> None:
        """The scheduler moved due timeouts onto a due stream."""

    def processes_removed(self, process_type: str, removed: int) -> None:
        """The scheduler removed finished processes whose retention passed."""

    # --- the calls it measures, as an interceptor ------------------------------------

    async def execute_command(
        self, input: CommandInput, next: Next[CommandInput, ExecutionResult]
    ) -> ExecutionResult:
        """Report the command's outcome, attempts and duration to `command_executed`."""
        name = input.command.metric_label()
        started = time.perf_counter()
        try:
            result = await next(input)
        except RetriesExhausted as exc:
            self.command_executed(
                name, seconds=time.perf_counter() - started, attempts=exc.attempts,
                outcome="gave up",
            )
            raise
        except DomainError:
            self.command_executed(
                name, seconds=time.perf_counter() - started, attempts=1, outcome="refused"
            )
            raise
        outcome = "duplicate" if result.duplicate else "written" if result.events else "unchanged"
        self.command_executed(
            name, seconds=time.perf_counter() - started, attempts=result.attempts,
            outcome=outcome,
        )
        return result

    async def handle(self, input: HandleInput, next: Next[HandleInput, None]) -> None:
        """Report a handler call that returned to `entry_handled` as "handled"."""
        started = time.perf_counter()
        await next(input)
        self.entry_handled(input.group, seconds=time.perf_counter() - started, outcome="handled")

    async def fire_timeout(
        self, input: TimeoutInput, next: Next[TimeoutInput, list[RecordedEvent]]
    ) -> list[RecordedEvent]:
        """Report the entry as "handled" and, if the step fired it, the timeout's lateness."""
        started = time.perf_counter()
        events = await next(input)
        if input.group is not None:
            self.entry_handled(
                input.group, seconds=time.perf_counter() - started, outcome="handled"
            )
        for event in events:
            if event.type == _TIMEOUT_FIRED:
                lateness = event.occurred_at.timestamp() * 1000 - input.payload.due_ms
                self.timeout_event(input.payload.process_type, "fired", max(0.0, lateness))
        return events


NO_OBSERVER = Observer()
"""The default: observes nothing (and is left out of interceptor chains)."""
