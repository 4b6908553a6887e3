"""The step: one trigger applied to one process, as a command the executor runs."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

import msgspec

from rsaga.commands import Command, StreamId, WritePlan, Writes
from rsaga.errors import DomainError, ValidationError
from rsaga.events import EventRegistry, RecordedEvent, new_id
from rsaga.process.api import (
    RUNAWAY,
    AdvanceTrigger,
    Decision,
    DefinitionError,
    IncompatibleDefinition,
    NothingToRetry,
    OperatorAction,
    ProcessFinished,
    ProcessInfo,
    ProcessManager,
    ProcessNotFound,
    RejectedTrigger,
    SucceededTrigger,
    Timeout,
    TimeoutTrigger,
    Trigger,
)
from rsaga.process.events import (
    FRAMEWORK_EVENTS,
    CommandRejected,
    CommandsIssued,
    ProcessCompensated,
    ProcessCompleted,
    ProcessFailed,
    ProcessRemoved,
    ProcessRetried,
    ProcessSignalled,
    ProcessStarted,
    ProcessTerminated,
    RetryScheduled,
    TimeoutCancelled,
    TimeoutFired,
    TimeoutScheduled,
)
from rsaga.process.index import IndexUpdate
from rsaga.process.registry import CommandRegistry
from rsaga.process.timeouts import (
    _TIMEOUT_NAME,
    DEADLINE,
    MAX_DUE_MS,
    MAX_TIMEOUT_SECONDS,
    TimeoutPayload,
    _payload_encoder,
    timeout_id,
)
from rsaga.records import STREAM, DeadLetterRecord
from rsaga.snapshots import SnapshotSpec, state_type_of
from rsaga.store import Effects, TimeoutWrite


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


# --- running steps ------------------------------------------------------------------------


class _Loaded(msgspec.Struct):
    info: ProcessInfo
    state: Any


def fold_info(info: ProcessInfo, data: object, occurred_ms: int) -> bool:
    """Fold one event's `data` into `info` if it is one of rsaga's process events.

    False if it is not (a user event, for the process's own `apply`). The one
    fold of `ProcessInfo`: the step and the inspection tools both use it.
    """
    match data:
        case ProcessStarted(definition_version=version):
            info.status = "active"
            info.started_at_ms = occurred_ms
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
        case ProcessRemoved():
            info.status = "removed"
        case (
            CommandsIssued() | CommandRejected() | ProcessTerminated() | ProcessSignalled()
            | ProcessRetried()
        ):
            pass
        case _:
            return False
    return True


@dataclass(slots=True)
class Seen:
    """What a step's last `handle` found: `removed`, a trigger for a removed process."""

    removed: bool = False


def snapshot_fold(process_type: str) -> str:
    """The fold name of a process type's snapshots (`rsaga.snapshots`)."""
    return f"process.{process_type}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessStep:
    """One trigger applied to one process: what the executor runs for a process step
    (never stored: it holds live objects). Counted in metrics under its process type."""

    stream: StreamId
    manager: ProcessManager[Any]
    process_id: str
    trigger: Trigger | OperatorAction | None
    now_ms: int
    commands: CommandRegistry
    events: EventRegistry
    correlation_id: str
    metadata: dict[str, str] | None = None
    retention_ms: int | None = None
    """How long the process is kept once it finishes (None: for ever)."""
    seen: Seen = field(default_factory=lambda: Seen())
    """What the last `handle` found, for the runner to report."""

    cache_state: ClassVar[bool] = True
    fold_per_stream: ClassVar[bool] = False

    def read_streams(self) -> list[str]:
        """The process's own stream."""
        return [self.stream]

    def fold_key(self) -> Hashable:
        """One cached fold per process stream and manager object."""
        return (ProcessStep, self.manager, self.stream)

    def resume(self, state: _Loaded) -> _Loaded:
        """A cached fold was made at another step's time."""
        state.info.now_ms = self.now_ms
        return state

    def merge(self, states: Mapping[str, _Loaded]) -> _Loaded:
        """Never called: a step reads one stream."""
        raise NotImplementedError("a process step folds one stream")

    def snapshot_spec(self) -> SnapshotSpec | None:
        """From the manager's `snapshot_every`; its definition `version` versions it."""
        manager = self.manager
        if not manager.snapshot_every:
            return None
        user_state = state_type_of(type(manager), ProcessManager)
        state_type: Any = tuple[ProcessInfo, user_state]  # type: ignore[valid-type]
        return SnapshotSpec(
            snapshot_fold(manager.name), manager.snapshot_every, state_type, manager.version
        )

    def to_snapshot(self, state: _Loaded) -> Any:
        """A snapshot stores rsaga's `ProcessInfo` and the user's state."""
        return (state.info, state.state)

    def from_snapshot(self, data: Any) -> _Loaded:
        """The fold a snapshot stands for, at this step's time."""
        return self.resume(_Loaded(*data))

    def more_streams(self, state: _Loaded) -> tuple[str, ...]:
        """None: a step reads its process's stream only."""
        return ()

    def metric_label(self) -> str:
        """Steps are counted per process type."""
        return self.manager.name

    def initial_state(self) -> _Loaded:
        """A new process of the manager's type, with its initial state."""
        manager = self.manager
        info = ProcessInfo(manager.name, self.process_id, self.stream, now_ms=self.now_ms)
        return _Loaded(info, manager.initial_state())

    def apply(self, state: _Loaded, event: RecordedEvent) -> _Loaded:
        """Fold one event of the process stream: rsaga's into `ProcessInfo`, the rest
        through the manager's `apply`."""
        info = state.info
        occurred_ms = int(event.occurred_at.timestamp() * 1000)
        if event.command_id != info.last_step:
            info.last_step = event.command_id
            if _unprompted(event.command_id):
                recent = info.unprompted_ms
                recent.append(occurred_ms)
                if len(recent) > self.manager.max_unprompted_steps:
                    del recent[0]
            else:
                info.unprompted_ms.clear()
        if not fold_info(info, event.data, occurred_ms):
            state.state = self.manager.apply(state.state, event)
        return state

    def handle(self, state: _Loaded) -> Writes | WritePlan:
        """Decide about the trigger and plan the step's one atomic write."""
        info, trigger = state.info, self.trigger
        manager: ProcessManager[Any] = self.manager
        if isinstance(trigger, OperatorAction):
            return self._operate(state, trigger)
        if info.finished or trigger is None:  # None: a step built only to fold
            self.seen.removed = info.status == "removed"
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
            manager, info, self.now_ms, self.commands, self.correlation_id, self.metadata,
            self.retention_ms,
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
            manager, info, self.now_ms, self.commands, self.correlation_id, self.metadata,
            self.retention_ms,
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
        commands: CommandRegistry,
        correlation_id: str,
        metadata: dict[str, str] | None = None,
        retention_ms: int | None = None,
    ) -> None:
        self.manager = manager
        self.retention_ms = retention_ms
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
            letters.append(DeadLetterRecord(
                handler=info.process_type,
                error_type="ProcessFailed",
                error=fail,
                failed_at_ms=self.now_ms,
                process_id=info.process_id,
                record={STREAM: info.stream_id.encode()},
            ).encode())
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
            retention_ms=self.retention_ms,
        )
        return WritePlan(
            {info.stream_id: self.events},
            Effects(
                schedule=list(self.schedule.values()),
                cancel=self.cancel,
                side_effects=[index],
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
