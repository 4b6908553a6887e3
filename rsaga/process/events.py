"""rsaga's own events on a process stream: lifecycle, timeouts, issued commands."""

from __future__ import annotations

from typing import Any

import msgspec


class ProcessStarted(msgspec.Struct, frozen=True, tag="rsaga.ProcessStarted"):
    """The process exists."""

    process_type: str
    process_id: str
    definition_version: int = 1
    deadline_ms: int | None = None


class TimeoutScheduled(msgspec.Struct, frozen=True, tag="rsaga.TimeoutScheduled"):
    """A timeout named `name` is due at `due_ms`; only `token` may fire it."""

    name: str
    token: str
    due_ms: int
    attempt: int = 1


class TimeoutCancelled(msgspec.Struct, frozen=True, tag="rsaga.TimeoutCancelled"):
    """The pending timeout `name` will not fire."""

    name: str
    token: str


class TimeoutFired(msgspec.Struct, frozen=True, tag="rsaga.TimeoutFired"):
    """The timeout `name` fired and was applied."""

    name: str
    token: str
    attempt: int
    due_ms: int


class IssuedCommand(msgspec.Struct, frozen=True, array_like=True):
    """A command as recorded on the process stream: its type name and its msgpack."""

    type: str
    payload: msgspec.Raw


class CommandsIssued(msgspec.Struct, frozen=True, tag="rsaga.CommandsIssued"):
    """Commands the step decided; they are executed after the commit, once each."""

    commands: list[IssuedCommand]
    confirm: bool = False
    """Each command's success is a `SucceededTrigger` of its own (`Decision.confirm`)."""


class CommandRejected(msgspec.Struct, frozen=True, tag="rsaga.CommandRejected"):
    """An issued command was refused with a domain error."""

    command: str
    reason: str


class RetryScheduled(msgspec.Struct, frozen=True, tag="rsaga.RetryScheduled"):
    """Step `step` will be retried at `retry_at_ms` (attempt `attempt`)."""

    step: str
    retry_at_ms: int
    attempt: int


class ProcessCompleted(msgspec.Struct, frozen=True, tag="rsaga.ProcessCompleted"):
    """The process finished successfully."""

    duration_ms: int = 0


class ProcessFailed(msgspec.Struct, frozen=True, tag="rsaga.ProcessFailed"):
    """The process finished unsuccessfully."""

    reason: str
    duration_ms: int = 0


class ProcessCompensated(msgspec.Struct, frozen=True, tag="rsaga.ProcessCompensated"):
    """The process did not reach its goal and undid what it had done, cleanly."""

    reason: str
    duration_ms: int = 0


class ProcessTerminated(msgspec.Struct, frozen=True, tag="rsaga.ProcessTerminated"):
    """An operator ended the process (with `compensate`, a saga undoes its steps first)."""

    reason: str
    by: str
    compensate: bool = False


class ProcessSignalled(msgspec.Struct, frozen=True, tag="rsaga.ProcessSignalled"):
    """An operator delivered `data` to the process (`decide` saw it as an `AdvanceTrigger`)."""

    data: Any
    by: str


class ProcessRetried(msgspec.Struct, frozen=True, tag="rsaga.ProcessRetried"):
    """An operator re-ran the process's current step: `what` was fired or re-delivered."""

    what: str
    by: str


class ProcessRemoved(msgspec.Struct, frozen=True, tag="rsaga.ProcessRemoved"):
    """The tombstone of a finished process whose retention passed: the only entry left on its
    stream, so a late trigger finds a finished process, not a new one."""

    process_type: str
    removed_at_ms: int


FRAMEWORK_EVENTS: tuple[type[msgspec.Struct], ...] = (
    ProcessTerminated,
    ProcessSignalled,
    ProcessRetried,
    ProcessStarted,
    TimeoutScheduled,
    TimeoutCancelled,
    TimeoutFired,
    CommandsIssued,
    CommandRejected,
    RetryScheduled,
    ProcessCompleted,
    ProcessFailed,
    ProcessCompensated,
    ProcessRemoved,
)
