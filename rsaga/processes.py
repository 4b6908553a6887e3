"""Process managers: stateful long-running processes that react to events and time.

A process type names itself, maps incoming events to a process instance id
(`correlate`), folds the events of its own stream into state (`apply`), and
decides what to do on each trigger (`decide`): events on its own stream,
commands to execute, timeouts to schedule or cancel, a retry, completion or
failure. Process state lives only in its stream ``<type>-<id>``.

One trigger is one *step*, run as a command through the executor:

1. read the process stream and fold it (framework events into `ProcessInfo`,
   the rest into the user's state);
2. drop the trigger if the process is finished, or if it is a timeout whose
   token is no longer the current one (the process moved on);
3. decide, and commit atomically: the step's events (tagged with the step's
   idempotency key), the timeouts it schedules or cancels, the lifecycle index,
   and a `CommandsIssued` record of the commands it decided;
4. execute those commands, each with its own idempotency key.

A version conflict (an event and a timeout of one process at once) re-runs
the step on fresh state, so a timeout that became stale is discarded. A
redelivered trigger finds its key in the stream and only completes step 4,
whose commands apply once. So every effect happens once over at-least-once
delivery, whatever order triggers arrive in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, Literal, NoReturn, TypeVar

import msgspec

from rsaga.clock import Clock, SystemClock
from rsaga.commands import Command, StreamId, WritePlan, Writes
from rsaga.errors import (
    DomainError,
    InvalidStreamId,
    RsagaError,
    UnknownEventType,
    ValidationError,
)
from rsaga.events import EventRegistry, RecordedEvent, new_id
from rsaga.executor import Executor
from rsaga.health import redis_down
from rsaga.interceptors import StepInput
from rsaga.keyspace import validate_stream_id
from rsaga.observe import Observer
from rsaga.retry import ExponentialBackoff, RetryPolicy
from rsaga.store import Effects, IndexUpdate, TimeoutWrite

S = TypeVar("S")

DEADLINE = "rsaga.deadline"
"""Name of the timeout that enforces a process's `deadline`."""

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


# --- events the framework writes on a process stream -------------------------------


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
)


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


MAX_TIMEOUT_SECONDS = 10 * 366 * 86400.0
"""The longest `Timeout.after` accepted: ten years."""
MAX_DUE_MS = 253402300799999
"""The latest `Timeout.at_ms` accepted: the end of the year 9999."""
# A timeout name becomes part of a timeout id, "<stream id>|<name>": stream id
# characters without the separator.
_TIMEOUT_NAME = re.compile(r"[A-Za-z0-9._:@/+=~!$%&()<>,;^#-]{1,100}")


def _refuse(where: str, field: str, problem: str) -> NoReturn:
    raise DefinitionError(f"{where}: {field} {problem}")


def _check_name(where: str, field: str, name: object) -> str:
    if not isinstance(name, str) or _TIMEOUT_NAME.fullmatch(name) is None:
        _refuse(
            where, field,
            f"must be a timeout name of 1-100 stream-id characters without '|', got {name!r}",
        )
    return name


def _check_list(where: str, field: str, value: object) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        _refuse(where, field, f"must be a list or tuple, got {type(value).__name__} {value!r}")
    return value


def _check_timeout(where: str, field: str, timeout: object) -> Timeout:
    if not isinstance(timeout, Timeout):
        _refuse(where, field, f"must be a Timeout, got {type(timeout).__name__}")
    _check_name(where, f"{field}.name", timeout.name)
    after = timeout.after
    if isinstance(after, bool) or not isinstance(after, (int, float)):
        _refuse(where, f"{field}.after", f"must be a number of seconds, got {after!r}")
    if math.isnan(after) or after == -math.inf or after > MAX_TIMEOUT_SECONDS:
        _refuse(where, f"{field}.after", f"must be at most {MAX_TIMEOUT_SECONDS:g}s, got {after!r}")
    attempt = timeout.attempt
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        _refuse(where, f"{field}.attempt", f"must be an int >= 1, got {attempt!r}")
    at_ms = timeout.at_ms
    if at_ms is not None and (
        isinstance(at_ms, bool) or not isinstance(at_ms, int) or not 0 <= at_ms <= MAX_DUE_MS
    ):
        _refuse(where, f"{field}.at_ms", f"must be None or an int of ms since the epoch, "
                f"got {at_ms!r}")
    return timeout


def check_decision(
    decision: object, where: str, events: EventRegistry, commands: CommandRegistry
) -> Decision:
    """Return `decision` if every part of it can be written and read back, else raise.

    `where` names the process ("process <type> <id>") in the `DefinitionError`,
    which also names the field. A schedule and a cancel of the same name are
    allowed: the cancel applies first, so the new timeout replaces the pending one.
    """
    if not isinstance(decision, Decision):
        _refuse(where, "decide()", f"returned {type(decision).__name__}, not a Decision")
    for i, event in enumerate(_check_list(where, "Decision.events", decision.events)):
        if not isinstance(event, msgspec.Struct) or type(event) not in events:
            _refuse(where, f"Decision.events[{i}]", f"is a {type(event).__qualname__}, not a "
                    "registered event type (list it in the process's `state_events`)")
        if isinstance(event, FRAMEWORK_EVENTS):
            _refuse(where, f"Decision.events[{i}]", f"is the framework's {type(event).__name__}; "
                    "use Decision.complete, fail, schedule or cancel instead")
    for i, command in enumerate(_check_list(where, "Decision.commands", decision.commands)):
        if not isinstance(command, Command) or not commands.knows(command):
            _refuse(where, f"Decision.commands[{i}]", f"is a {type(command).__qualname__}, not a "
                    "command type of the process (list it in the process's `commands`)")
    names: set[str] = set()
    for i, timeout in enumerate(_check_list(where, "Decision.schedule", decision.schedule)):
        name = _check_timeout(where, f"Decision.schedule[{i}]", timeout).name
        if name in names:
            _refuse(where, f"Decision.schedule[{i}].name", f"{name!r} is scheduled twice")
        names.add(name)
    for i, name in enumerate(_check_list(where, "Decision.cancel", decision.cancel)):
        _check_name(where, f"Decision.cancel[{i}]", name)
    if decision.retry is not None:
        _check_name(where, "Decision.retry", decision.retry)
        if decision.retry in names:
            _refuse(where, "Decision.retry", f"{decision.retry!r} is also in Decision.schedule")
    for flag in ("complete", "escalate", "confirm"):
        if not isinstance(getattr(decision, flag), bool):
            _refuse(where, f"Decision.{flag}", f"must be a bool, got {getattr(decision, flag)!r}")
    for reason in ("fail", "compensated"):
        value = getattr(decision, reason)
        if value is not None and (not isinstance(value, str) or not value):
            _refuse(where, f"Decision.{reason}", f"must be None or a reason (a non-empty str), "
                    f"got {value!r}")
    if decision.escalate and decision.fail is None:
        _refuse(where, "Decision.escalate", "needs Decision.fail (the failure to escalate)")
    ends = [e for e in ("complete", "fail", "compensated") if getattr(decision, e) not in
            (None, False)]
    if len(ends) > 1:
        _refuse(where, f"Decision.{ends[0]}", f"and Decision.{ends[1]} cannot both end the "
                "process")
    return decision


Status = Literal["new", "active", "completed", "failed", "compensated"]


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
        """Completed, failed or compensated."""
        return self.status in ("completed", "failed", "compensated")


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
        from rsaga.handlers import check_name

        check_name(cls)
        if cls.deadline is not None and cls.deadline <= 0:
            raise ValidationError(f"process {cls.name}: deadline must be > 0")
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


class TimeoutPayload(msgspec.Struct, frozen=True, array_like=True):
    """A scheduled timeout as stored in Redis and delivered by the scheduler."""

    process_type: str
    process_id: str
    name: str
    token: str
    attempt: int
    due_ms: int
    correlation_id: str | None = None
    """Of the step that scheduled it: the step it triggers continues the correlation."""
    metadata: dict[str, str] | None = None
    """Of the step that scheduled it (e.g. its trace context): see `rsaga.interceptors`."""


_payload_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(TimeoutPayload)


def decode_timeout(blob: bytes) -> TimeoutPayload:
    """Decode a stored timeout payload (`msgspec.DecodeError` if corrupt)."""
    return _payload_decoder.decode(blob)


def timeout_id(stream_id: str, name: str) -> str:
    """Id of the pending timeout `name` of the process with stream `stream_id`."""
    return f"{stream_id}|{name}"


class CommandRegistry:
    """Maps command type names (their msgspec tag) to command types, to store and run them."""

    def __init__(self) -> None:
        self._by_name: dict[str, type[Command[Any]]] = {}
        self._encoder = msgspec.msgpack.Encoder()

    def register(self, *types: type[Command[Any]]) -> None:
        """Register command types; a name taken by another type is an error."""
        for cls in types:
            if not (isinstance(cls, type) and issubclass(cls, Command)):
                raise ValidationError(f"{cls!r} is not a Command subclass")
            name = str(cls.__struct_config__.tag)
            known = self._by_name.get(name)
            if known is not None and known is not cls:
                raise ValidationError(f"command name {name!r} is taken by {known.__qualname__}")
            self._by_name[name] = cls

    def knows(self, command: Command[Any]) -> bool:
        """Whether `command`'s type is the registered one of its name."""
        return self._by_name.get(str(type(command).__struct_config__.tag)) is type(command)

    def encode(self, command: Command[Any]) -> IssuedCommand:
        """The stored form of `command`; its type must be registered."""
        name = str(type(command).__struct_config__.tag)
        if self._by_name.get(name) is not type(command):
            raise ValidationError(
                f"command type {type(command).__qualname__} is not registered; "
                "list it in the process manager's `commands`"
            )
        return IssuedCommand(name, msgspec.Raw(self._encoder.encode(command)))

    def decode(self, issued: IssuedCommand) -> Command[Any]:
        """The command a stored `IssuedCommand` describes."""
        try:
            cls = self._by_name[issued.type]
        except KeyError:
            raise UnknownCommandType(f"command type {issued.type!r} is not registered") from None
        command: Command[Any] = msgspec.msgpack.decode(issued.payload, type=cls)
        return command


class UnknownCommandType(RsagaError):
    """A stored command names a type no registry knows."""


# --- running steps ------------------------------------------------------------------------


class _Loaded(msgspec.Struct):
    info: ProcessInfo
    state: Any


class _Step(Command[_Loaded], frozen=True, tag="rsaga.ProcessStep"):
    """One trigger applied to one process (never stored: it holds live objects)."""

    stream: StreamId
    manager: Any
    process_id: str
    trigger: Any
    now_ms: int
    commands: Any
    events: Any
    correlation_id: str
    metadata: Any = None

    def metric_label(self) -> str:
        """Steps are counted per process type."""
        return str(self.manager.name)

    def initial_state(self) -> _Loaded:
        manager: ProcessManager[Any] = self.manager
        info = ProcessInfo(manager.name, self.process_id, self.stream, now_ms=self.now_ms)
        return _Loaded(info, manager.initial_state())

    def apply(self, state: _Loaded, event: RecordedEvent) -> _Loaded:
        info = state.info
        if event.command_id != info.last_step:
            info.last_step = event.command_id
            if _unprompted(event.command_id):
                recent = info.unprompted_ms
                recent.append(int(event.occurred_at.timestamp() * 1000))
                if len(recent) > self.manager.max_unprompted_steps:
                    del recent[0]
            else:
                info.unprompted_ms.clear()
        match event.data:
            case ProcessStarted(definition_version=version):
                info.status = "active"
                info.started_at_ms = int(event.occurred_at.timestamp() * 1000)
                info.definition_version = version
            case TimeoutScheduled(name=name, token=token, due_ms=due_ms, attempt=attempt):
                info.pending[name] = token
                info.due[name] = due_ms
                info.attempts[name] = attempt
                _note_retry(info.retried, name, attempt)
            case TimeoutCancelled(name=name, token=token) | TimeoutFired(name=name, token=token):
                if info.pending.get(name) == token:
                    del info.pending[name]
                    info.due.pop(name, None)
                    info.attempts.pop(name, None)
                    info.retried.pop(name, None)
            case RetryScheduled(step=step, attempt=attempt):
                info.retries[step] = attempt
                info.retried[step] = attempt
            case ProcessCompleted():
                info.status = "completed"
            case ProcessFailed():
                info.status = "failed"
            case ProcessCompensated():
                info.status = "compensated"
            case (
                CommandsIssued() | CommandRejected() | ProcessTerminated() | ProcessSignalled()
                | ProcessRetried()
            ):
                pass
            case _:
                state.state = self.manager.apply(state.state, event)
        return state

    def handle(self, state: _Loaded) -> Writes | WritePlan:
        info, trigger = state.info, self.trigger
        manager: ProcessManager[Any] = self.manager
        if isinstance(trigger, OperatorAction):
            return self._operate(state, trigger)
        if info.finished:
            return {}
        if info.status != "new" and info.definition_version < manager.compatible_since:
            raise IncompatibleDefinition(
                f"process {info.stream_id} was started by {manager.name} definition version "
                f"{info.definition_version}; this definition (version {manager.version}) "
                f"continues versions >= {manager.compatible_since} only"
            )
        if isinstance(trigger, TimeoutTrigger) and info.pending.get(trigger.name) != trigger.token:
            return {}
        plan = _Plan(
            manager, info, self.now_ms, self.commands, self.correlation_id, self.metadata
        )
        if isinstance(trigger, TimeoutTrigger):
            plan.fired(trigger)
        if isinstance(trigger, RejectedTrigger):
            name = str(type(trigger.command).__struct_config__.tag)
            plan.events.append(CommandRejected(name, trigger.reason))
        if isinstance(trigger, TimeoutTrigger) and trigger.name == DEADLINE:
            decision = Decision(fail=f"deadline of {manager.deadline:g}s passed")
        elif (runaway := self._runaway(info)) is not None:
            decision = Decision(fail=runaway)
        else:
            decision = self._decide(state, trigger)
        if decision.is_empty() and not plan.events:
            return {}
        return plan.build(decision)

    def _decide(self, state: _Loaded, trigger: Trigger) -> Decision:
        """`decide`, with what it returns checked (a `DomainError` is a definition error)."""
        manager: ProcessManager[Any] = self.manager
        where = f"process {manager.name} {state.info.process_id}"
        try:
            decided = manager.decide(state.state, trigger, state.info)
        except DomainError as exc:
            raise DefinitionError(f"{where}: decide() raised {exc!r}") from exc
        return check_decision(decided, where, self.events, self.commands)

    def _operate(self, state: _Loaded, action: OperatorAction) -> WritePlan:
        """An operator's action: refused unless the process is active; always recorded."""
        info, manager = state.info, self.manager
        where = f"process {info.stream_id}"
        if info.status == "new":
            raise ProcessNotFound(f"no process with stream {info.stream_id!r}")
        if info.finished:
            raise ProcessFinished(
                f"{where} already ended {info.status}: nothing to {action.action}"
            )
        plan = _Plan(
            manager, info, self.now_ms, self.commands, self.correlation_id, self.metadata
        )
        if action.action == "terminate":
            plan.events.append(ProcessTerminated(action.reason, action.by, action.compensate))
            reason = f"terminated by {action.by}: {action.reason}"
            if not action.compensate:
                return plan.build(Decision(fail=reason))
            decided = manager.compensate(state.state, info, reason)
            if decided is None:
                raise ValidationError(
                    f"{where}: {manager.name} is not a saga and has no compensations; "
                    "terminate it without compensating"
                )
            where = f"process {manager.name} {info.process_id}"
            return plan.build(check_decision(decided, where, self.events, self.commands))
        if action.action == "signal":
            plan.events.append(ProcessSignalled(action.data, action.by))
            return plan.build(self._decide(state, AdvanceTrigger(action.data)))
        if action.dead_letter:
            plan.events.append(ProcessRetried(f"dead letter {action.dead_letter}", action.by))
            return plan.build(Decision())
        name = action.timeout
        if name is None:
            waiting = {n: due for n, due in info.due.items() if n != DEADLINE}
            name = min(waiting, key=waiting.__getitem__, default=None)
        if name is None or name not in info.pending:
            raise NothingToRetry(
                f"{where} has no pending timeout {name!r} to fire" if action.timeout else
                f"{where} has no pending timeout and no dead-lettered trigger: nothing to retry"
            )
        fired = TimeoutTrigger(name, info.attempts.get(name, 1), info.due[name], info.pending[name])
        plan.events.append(ProcessRetried(f"timeout {name}", action.by))
        plan.fired(fired)
        plan.cancel.append(timeout_id(info.stream_id, name))  # fired now, not again when due
        if name == DEADLINE:
            return plan.build(Decision(fail=f"deadline of {manager.deadline:g}s passed"))
        return plan.build(self._decide(state, fired))


    def _runaway(self, info: ProcessInfo) -> str | None:
        """Why this step would be one unprompted step too many, if it would."""
        if not isinstance(self.trigger, TimeoutTrigger | RejectedTrigger | SucceededTrigger):
            return None
        manager: ProcessManager[Any] = self.manager
        limit, recent = manager.max_unprompted_steps, info.unprompted_ms
        if len(recent) < limit or self.now_ms - recent[-limit] >= manager.unprompted_window * 1000:
            return None
        return (
            f"{RUNAWAY}{limit} steps within {manager.unprompted_window:g}s without any outside "
            "trigger (does a timeout reschedule itself at 0 s?)"
        )


def _unprompted(step_key: str | None) -> bool:
    """Whether the step with this idempotency key ran on the process's own account: a
    timeout, or the outcome of a command it issued (see `ProcessRunner` for the keys)."""
    return step_key is not None and (":timeout:" in step_key or ":command:" in step_key)


class _Plan:
    """Turns a decision into the events and effects of one atomic write."""

    def __init__(
        self,
        manager: ProcessManager[Any],
        info: ProcessInfo,
        now_ms: int,
        commands: Any,
        correlation_id: str,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.manager = manager
        self.correlation_id = correlation_id
        self.metadata = metadata
        self.info = info
        self.now_ms = now_ms
        self.registry: CommandRegistry = commands
        self.events: list[msgspec.Struct] = []
        self.schedule: dict[str, TimeoutWrite] = {}
        self.cancel: list[str] = []
        self.pending = dict(info.pending)
        self.due = dict(info.due)
        self.retried = dict(info.retried)

    def fired(self, trigger: TimeoutTrigger) -> None:
        self.events.append(
            TimeoutFired(trigger.name, trigger.token, trigger.attempt, trigger.due_ms)
        )
        self.pending.pop(trigger.name, None)
        self.due.pop(trigger.name, None)
        self.retried.pop(trigger.name, None)

    def _schedule(self, name: str, due_ms: int, attempt: int) -> None:
        token = new_id()
        info = self.info
        self.events.append(TimeoutScheduled(name, token, due_ms, attempt))
        payload = TimeoutPayload(
            info.process_type, info.process_id, name, token, attempt, due_ms, self.correlation_id,
            self.metadata,
        )
        tid = timeout_id(info.stream_id, name)
        if tid in self.cancel:
            # commit.lua schedules before it cancels: a cancel of the same id
            # would remove the new timeout, and the new one replaces the old anyway.
            self.cancel.remove(tid)
        self.schedule[name] = TimeoutWrite(tid, due_ms, _payload_encoder.encode(payload))
        self.pending[name] = token
        self.due[name] = due_ms
        _note_retry(self.retried, name, attempt)

    def _cancel(self, name: str) -> None:
        token = self.pending.pop(name, None)
        self.due.pop(name, None)
        self.retried.pop(name, None)
        if token is not None:
            self.events.append(TimeoutCancelled(name, token))
            self.schedule.pop(name, None)
            self.cancel.append(timeout_id(self.info.stream_id, name))

    def build(self, decision: Decision) -> WritePlan:
        info, manager = self.info, self.manager
        transition = "progress"
        if info.status == "new":
            transition = "start"
            deadline_ms = None
            if manager.deadline is not None:
                deadline_ms = self.now_ms + round(manager.deadline * 1000)
            self.events.insert(
                0, ProcessStarted(info.process_type, info.process_id, manager.version, deadline_ms)
            )
            if deadline_ms is not None:
                self._schedule(DEADLINE, deadline_ms, 1)
        self.events.extend(decision.events)
        for name in decision.cancel:
            self._cancel(name)
        for timeout in decision.schedule:
            if timeout.at_ms is not None:
                due = timeout.at_ms
            else:
                due = self.now_ms + max(0, round(timeout.after * 1000))
            self._schedule(timeout.name, due, timeout.attempt)
        fail = decision.fail
        if decision.retry is not None:
            attempt = info.retries.get(decision.retry, 0) + 1
            delay = manager.retry.delay(attempt)
            if delay is None:
                fail = fail or f"{decision.retry}: gave up after {attempt - 1} retries"
            else:
                retry_at = self.now_ms + round(delay * 1000)
                self.events.append(RetryScheduled(decision.retry, retry_at, attempt))
                self.retried[decision.retry] = attempt
                self._schedule(decision.retry, retry_at, attempt)
        if decision.commands:
            self.events.append(
                CommandsIssued(
                    [self.registry.encode(c) for c in decision.commands], decision.confirm
                )
            )
        started = info.started_at_ms or self.now_ms
        duration = max(0, self.now_ms - started)
        if fail is not None or decision.complete or decision.compensated is not None:
            for name in list(self.pending):
                self._cancel(name)
            if fail is not None:
                self.events.append(ProcessFailed(fail, duration))
                transition = "fail"
            elif decision.compensated is not None:
                self.events.append(ProcessCompensated(decision.compensated, duration))
                transition = "compensate"
            else:
                self.events.append(ProcessCompleted(duration))
                transition = "complete"
        letters = []
        if fail is not None and decision.escalate:
            letters.append({
                "handler": info.process_type,
                "s": info.stream_id,
                "error_type": "ProcessFailed",
                "error": fail,
                "failed_at_ms": str(self.now_ms),
                "process_id": info.process_id,
            })
        retry_step, retries = max(
            self.retried.items(), key=lambda item: item[1], default=("", 0)
        )
        if retries == 0 and not any(info.retried.values()):
            retries = -1  # was not retrying, is not: the index has nothing to change
        index = IndexUpdate(
            info.process_type,
            info.stream_id,
            transition,
            duration if transition in ("complete", "fail", "compensate") else 0,
            min(self.due.values(), default=None),
            starts=info.status == "new",
            correlation_id=self.correlation_id,
            retry_step=retry_step,
            retries=retries,
        )
        return WritePlan(
            {info.stream_id: self.events},
            Effects(
                schedule=list(self.schedule.values()),
                cancel=self.cancel,
                index=[index],
                dead_letters=letters,
            ),
        )


def _note_retry(retried: dict[str, int], name: str, attempt: int) -> None:
    """Record what timeout `name`, scheduled as attempt `attempt`, retries.

    A `Decision.retry` records its retry number first (`RetryScheduled`), and its
    timeout carries the same number; any other timeout's attempt N is the N-1th retry.
    """
    if retried.get(name) != attempt:
        retried[name] = attempt - 1


class ProcessRunner:
    """Runs process steps: for events (through the worker), timeouts, and explicit calls."""

    def __init__(
        self,
        executor: Executor,
        managers: Sequence[ProcessManager[Any]],
        *,
        clock: Clock | None = None,
    ) -> None:
        self.executor = executor
        self.clock: Clock = clock or SystemClock()
        self.managers = {m.name: m for m in managers}
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
        step = _Step(
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
        step = _Step(
            stream=stream,
            manager=manager,
            process_id=process_id,
            trigger=trigger,
            now_ms=self.clock.now_ms(),
            commands=self.commands,
            events=self.executor.store.registry,
            correlation_id=correlation_id,
            metadata=call.metadata,
        )
        result = await self.executor.execute(
            step, correlation_id=correlation_id, causation_id=causation_id, idempotency_key=key,
            metadata=call.metadata,
        )
        if not result.duplicate:
            self._observe(manager, trigger, result.events)
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
