"""What users import to write a process type: triggers, decisions, `ProcessManager`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar

import msgspec

from rsaga.commands import Command
from rsaga.errors import RsagaError, ValidationError
from rsaga.events import RecordedEvent
from rsaga.keyspace import validate_stream_id
from rsaga.names import check_name
from rsaga.observe import Observer
from rsaga.retry import ExponentialBackoff, RetryPolicy

S = TypeVar("S")

RUNAWAY = "runaway: "
"""Start of the failure reason of a process stopped for stepping without outside input."""


class UnknownProcessType(RsagaError):
    """A timeout or command names a process type no installed manager has."""


class IncompatibleDefinition(RsagaError):
    """A running process was started by a definition version this one cannot continue."""


class DefinitionError(RsagaError):
    """A process definition failed in a way no retry can fix.

    `decide` returned an invalid decision or raised a `DomainError`, or
    `correlate` returned something that is not a process id. Nothing of the
    step is written; the trigger goes to dead letters at once, with this
    message, for replay once the definition is fixed.
    """


# --- triggers -------------------------------------------------------------------------


class EventTrigger(msgspec.Struct, frozen=True):
    """An event from another stream that correlated to this process."""

    event: RecordedEvent


class TimeoutTrigger(msgspec.Struct, frozen=True):
    """A timeout of this process fell due (and is still current)."""

    name: str
    attempt: int
    due_ms: int
    token: str


class StartTrigger(msgspec.Struct, frozen=True):
    """An explicit start, with data from the caller."""

    data: Any = None


class AdvanceTrigger(msgspec.Struct, frozen=True):
    """An explicit nudge from outside, with data from the caller."""

    data: Any = None


class RejectedTrigger(msgspec.Struct, frozen=True):
    """A command this process issued was refused with a domain error.

    With `Decision.confirm`, also a command that kept failing with another
    error until the process type's `handler_retry` was spent.
    """

    command: Command[Any]
    reason: str


class SucceededTrigger(msgspec.Struct, frozen=True):
    """A command this process issued with `Decision.confirm` succeeded."""

    command: Command[Any]


Trigger = (
    EventTrigger | TimeoutTrigger | StartTrigger | AdvanceTrigger | RejectedTrigger
    | SucceededTrigger
)


class OperatorAction(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's action on one process (see `rsaga.operator`); `decide` never sees it,
    only what it stands for (an `AdvanceTrigger` for a signal, a `TimeoutTrigger` for a retry)."""

    action: Literal["terminate", "signal", "retry"]
    by: str
    reason: str = ""
    compensate: bool = False
    data: Any = None
    timeout: str | None = None
    """retry: the pending timeout to fire now (None: the next one due, the deadline aside)."""
    dead_letter: str = ""
    """retry: the dead-lettered trigger about to be re-delivered (recorded only)."""


class ProcessNotFound(ValidationError):
    """An operator action named a stream that holds no process."""


class ProcessFinished(ValidationError):
    """An operator action on a process that already ended."""


class NothingToRetry(ValidationError):
    """`retry` of a process with no pending timeout and no dead-lettered trigger."""


# --- decisions --------------------------------------------------------------------------


class Timeout(msgspec.Struct, frozen=True):
    """A timeout to schedule (replacing a pending one of the same name).

    It is due `after` seconds from now, or at `at_ms` (ms since the epoch) if
    given; a due time in the past fires at once.
    """

    name: str
    after: float = 0.0
    attempt: int = 1
    at_ms: int | None = None


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What a process does about one trigger. Empty: nothing (the trigger is ignored)."""

    events: Sequence[msgspec.Struct] = ()
    """Events for the process's own stream."""
    commands: Sequence[Command[Any]] = ()
    """Commands to execute (after the step commits), each applied once."""
    schedule: Sequence[Timeout] = ()
    """Timeouts to schedule."""
    cancel: Sequence[str] = ()
    """Names of pending timeouts to cancel."""
    retry: str | None = None
    """A step to retry after the delay the process's retry policy gives; fails once spent."""
    complete: bool = False
    """Finish the process successfully (pending timeouts are cancelled)."""
    fail: str | None = None
    """Finish the process unsuccessfully with this reason."""
    escalate: bool = False
    """With `fail`: also record the failure in dead letters, for an operator to act on."""
    compensated: str | None = None
    """Finish the process as compensated with this reason: it did not reach its goal and
    undid what it had done (a saga whose compensations all succeeded)."""
    confirm: bool = False
    """Tell the process when each of `commands` succeeds: a `SucceededTrigger` step follows
    it (a synchronous saga step is done when its command succeeds)."""

    def is_empty(self) -> bool:
        """True if the decision does nothing."""
        return not (
            self.events or self.commands or self.schedule or self.cancel or self.retry
            or self.complete or self.fail or self.compensated
        )


Status = Literal["new", "active", "completed", "failed", "compensated", "removed"]
"""'removed': the process finished and its retention passed; only a tombstone is left."""


class ProcessInfo(msgspec.Struct):
    """What the framework knows of a process, folded from its stream."""

    process_type: str
    process_id: str
    stream_id: str
    status: Status = "new"
    started_at_ms: int = 0
    now_ms: int = 0
    """The deciding worker's clock: due times of new timeouts count from it."""
    pending: dict[str, str] = msgspec.field(default_factory=dict)
    """Pending timeouts: name -> token."""
    due: dict[str, int] = msgspec.field(default_factory=dict)
    """Pending timeouts: name -> due time (ms since the epoch)."""
    attempts: dict[str, int] = msgspec.field(default_factory=dict)
    """Pending timeouts: name -> attempt."""
    retries: dict[str, int] = msgspec.field(default_factory=dict)
    """Retries scheduled so far, per step."""
    retried: dict[str, int] = msgspec.field(default_factory=dict)
    """Pending timeouts that retry a step: name -> how many retries of it they make."""
    definition_version: int = 1
    unprompted_ms: list[int] = msgspec.field(default_factory=list)
    """When the recent steps since the last outside trigger ran (timeouts, command
    outcomes), oldest first; at most `max_unprompted_steps` are kept."""
    last_step: str | None = None
    """Idempotency key of the latest step."""

    @property
    def finished(self) -> bool:
        """Completed, failed or compensated (and 'removed': finished once, then removed)."""
        return self.status in ("completed", "failed", "compensated", "removed")


# --- the process manager API -------------------------------------------------------------


class ProcessManager(Generic[S]):
    """Base class of process types over user state `S`.

    Subclasses set `name` and `events` and define `correlate`, `initial_state`,
    `apply` and `decide`.
    """

    name: ClassVar[str]
    """Process type name: also its consumer group and its streams' prefix."""
    events: ClassVar[tuple[type[msgspec.Struct], ...]] = ()
    """Event types from other streams that may trigger the process."""
    state_events: ClassVar[tuple[type[msgspec.Struct], ...]] = ()
    """Event types the process writes on its own stream."""
    commands: ClassVar[tuple[type[Command[Any]], ...]] = ()
    """Command types the process issues (their names are stored)."""
    decodes: ClassVar[tuple[type[msgspec.Struct], ...]] = ()
    """Further event types the commands it issues read from their streams, other than
    `events`, `state_events` and what the commands declare in `Command.emits`."""
    retry: ClassVar[RetryPolicy] = ExponentialBackoff(base=1.0, cap=300.0, max_retries=5)
    """Delays of `Decision.retry`; once spent, the process fails."""
    deadline: ClassVar[float | None] = None
    """Seconds from the start after which an unfinished process fails."""
    average_duration_warning: ClassVar[float | None] = None
    """`rsaga health` warns when the mean duration (s) of the last 1,000 finished processes
    of this type is above it; None: `health.average_duration_warning`; 0: off."""
    max_process_age: ClassVar[float | None] = None
    """`rsaga health` warns of active processes of this type started longer ago (s) than
    it; None: `health.max_process_age`; 0: off."""
    max_retry_count: ClassVar[int | None] = None
    """`rsaga health` warns of active processes of this type whose current step has been
    retried at least this many times; None: `health.max_retry_count`; 0: off."""
    retention: ClassVar[float | Literal["setting"] | None] = "setting"
    """Seconds a finished process of this type is kept before the scheduler removes its
    stream and index entries (a tombstone stays, so a late trigger is ignored); None: for
    ever; "setting": `processes.retention`. Applies to processes finishing from then on."""
    version: ClassVar[int] = 1
    """Definition version, stored when a process starts. Raise it with every change."""
    compatible_since: ClassVar[int] = 1
    """Oldest definition version whose running processes this one can continue.

    Adding a field with a default keeps old processes working (old events decode
    with the default); for a change that does not, raise this, and triggers of
    older processes go to dead letters with a clear reason instead of misbehaving.
    """
    handler_retry: ClassVar[RetryPolicy] = ExponentialBackoff(base=0.1, cap=5.0, max_retries=4)
    """Retries of a step that raised unexpectedly, before it goes to dead letters."""
    claim_timeout: ClassVar[float] = 30.0
    """Seconds a silent worker keeps its triggers before others take over."""
    max_unprompted_steps: ClassVar[int] = 100
    """A process that takes more steps than this within `unprompted_window` seconds with
    no outside trigger (an event, a start, an advance) in between fails as a runaway: a
    timeout that reschedules itself at 0 s would otherwise loop for ever."""
    unprompted_window: ClassVar[float] = 10.0
    """See `max_unprompted_steps`."""
    snapshot_every: ClassVar[int] = 0
    """Snapshot the folded state every this many events of a process's stream (0: never;
    see `rsaga.snapshots`); the state type `S` must be msgspec's. A new `version` makes
    older snapshots be ignored."""

    def correlate(self, event: RecordedEvent) -> str | None:
        """The process instance id `event` belongs to, or None to ignore it."""
        raise NotImplementedError

    def initial_state(self) -> S:
        """State of a process before any of its events."""
        raise NotImplementedError

    def apply(self, state: S, event: RecordedEvent) -> S:
        """Fold one event of the process's own stream (framework events excluded)."""
        return state

    def decide(self, state: S, trigger: Trigger, process: ProcessInfo) -> Decision:
        """What to do about `trigger`; a finished process is never asked."""
        raise NotImplementedError

    def compensate(self, state: S, process: ProcessInfo, reason: str) -> Decision | None:
        """What to do when an operator terminates the process with compensation (`reason`
        says who and why); None: this type has nothing to compensate (the default; sagas do)."""
        return None

    def report(self, event: msgspec.Struct, observer: Observer) -> None:
        """Tell `observer` about one of this process's own new events (none by default)."""

    @classmethod
    def stream_id(cls, process_id: str) -> str:
        """The stream of process `process_id`."""
        return validate_stream_id(f"{cls.name}-{process_id}")

    @classmethod
    def validate(cls) -> None:
        """Raise `ValidationError` if the class is not a usable process type."""
        check_name(cls)
        if cls.deadline is not None and cls.deadline <= 0:
            raise ValidationError(f"process {cls.name}: deadline must be > 0")
        retention = cls.retention
        if retention not in (None, "setting") and (
            isinstance(retention, bool) or not isinstance(retention, (int, float))
            or not 0 <= retention < math.inf
        ):
            raise ValidationError(
                f"process {cls.name}: retention must be None, \"setting\" or seconds >= 0, "
                f"got {retention!r}"
            )
        steps, window = cls.max_unprompted_steps, cls.unprompted_window
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValidationError(f"process {cls.name}: max_unprompted_steps must be an int >= 1")
        if not isinstance(window, (int, float)) or not window > 0:
            raise ValidationError(f"process {cls.name}: unprompted_window must be > 0")
        for threshold in ("average_duration_warning", "max_process_age", "max_retry_count"):
            value = getattr(cls, threshold)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
            ):
                raise ValidationError(f"process {cls.name}: {threshold} must be None or >= 0")
