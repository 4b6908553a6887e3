"""Seams for cross-cutting concerns: the runtime reports what happens to an `Observer`.

Every hook is a no-op here; `rsaga.metrics.PrometheusObserver` implements them
for Prometheus. The worker, executor, process runner and scheduler call the
hooks; none of them knows about metrics.
"""

from __future__ import annotations


class Observer:
    """Receives what the runtime does. Subclass and override what you need."""

    def command_executed(
        self, command: str, *, seconds: float, attempts: int, outcome: str
    ) -> None:
        """A command ran: outcome is "written", "unchanged", "duplicate", "refused" or "gave up"."""

    def entry_handled(self, group: str, *, seconds: float, outcome: str) -> None:
        """A handler finished an entry: "handled", "skipped", "retried" or "dead_lettered"."""

    def process_transition(self, process_type: str, transition: str, duration_ms: int) -> None:
        """A process step committed a lifecycle transition: "start", "complete", "fail",
        or "compensate" (ended compensated); "runaway" follows the "fail" of a process
        stopped for stepping without outside input."""

    def timeout_event(self, process_type: str, kind: str, lateness_ms: float = 0.0) -> None:
        """A timeout was "scheduled", "fired" (with its lateness) or "discarded"."""

    def saga_event(self, saga: str, kind: str) -> None:
        """A saga "compensated" a step or a compensation "failed" for good."""

    def timeouts_moved(self, shard: int, moved: int) -> None:
        """The scheduler moved due timeouts onto a due stream."""


NO_OBSERVER = Observer()
"""The default: observes nothing."""
