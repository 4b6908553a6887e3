"""The process index: a process step's lifecycle transition, applied by the commit as a
side effect (``commit.lua`` calls ``update_process_index`` from
``lua/includes/process_index.lua``); the store passes it through uninterpreted."""

from __future__ import annotations

import msgspec

from rsaga.errors import ValidationError
from rsaga.keyspace import Keyspace
from rsaga.scripts import SideEffect

TRANSITIONS = ("start", "progress", "complete", "fail", "compensate")


class IndexUpdate(msgspec.Struct, frozen=True):
    """A process lifecycle transition to record in the same atomic write."""

    process_type: str
    stream_id: str
    transition: str
    """'start', 'progress', 'complete', 'fail' or 'compensate'."""
    duration_ms: int = 0
    next_due_ms: int | None = None
    """Due time of the process's earliest pending timeout: it is waiting, not stuck."""
    starts: bool = False
    """This write starts the process (it may also end it)."""
    correlation_id: str = ""
    """The correlation id the process started in (read when `starts`): search finds it."""
    retry_step: str = ""
    """The step being retried, when `retries` > 0."""
    retries: int = -1
    """How many times the current step has been retried after this write: 0 when the
    process stops retrying, -1 when it neither was nor is retrying (nothing to write)."""
    retention_ms: int | None = None
    """How long the process is kept once this write finishes it (None: for ever)."""

    def side_effect(self, keyspace: Keyspace, shard: int) -> SideEffect:
        """The ``process_index`` extension call of a commit in `shard`."""
        if self.transition not in TRANSITIONS:
            raise ValidationError(f"unknown process transition {self.transition!r}")
        next_due = -1 if self.next_due_ms is None else self.next_due_ms
        return SideEffect(
            "process_index",
            keyspace.process_index(shard, self.process_type),
            [
                self.process_type, self.transition, self.stream_id, self.duration_ms,
                next_due, int(self.starts), self.correlation_id, self.retry_step,
                self.retries, -1 if self.retention_ms is None else self.retention_ms,
            ],
        )
