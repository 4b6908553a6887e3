"""Sagas: ordered steps with compensations, on top of process managers.

A saga runs its steps in order. A step's action is a command; the step is done
when the command succeeds (a synchronous step) or when a correlated reply
event arrives (an asynchronous step: the action sends a request, the saga
waits, with a per-step timeout). When a step fails (a domain error, a failure
reply, or its timeout), the saga compensates the steps that completed, in
reverse order. A step that timed out may have happened anyway, so it is
compensated too (cancellations must therefore accept "nothing to cancel").
Each compensation is durable and retried with backoff; one that still fails
after its retries ends the saga in CompensationFailed and reports it in dead
letters for an operator.

The saga's whole history is its stream: the framework's step events below,
the replies it received, and the process lifecycle events.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import msgspec

from rsaga.commands import Command
from rsaga.errors import ValidationError
from rsaga.events import RecordedEvent
from rsaga.observe import Observer
from rsaga.process.api import (
    Decision,
    EventTrigger,
    ProcessInfo,
    ProcessManager,
    RejectedTrigger,
    StartTrigger,
    SucceededTrigger,
    Timeout,
    TimeoutTrigger,
    Trigger,
)
from rsaga.process.timeouts import MAX_TIMEOUT_SECONDS
from rsaga.retry import ExponentialBackoff, RetryPolicy

S = TypeVar("S")

_STEP_NAME = re.compile(r"[A-Za-z0-9._-]{1,60}")

Action = Callable[[Any, str], Command[Any]]
"""Builds a step's command from the saga's state and the saga id."""


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a saga: an action, its compensation, and the replies that end each."""

    name: str
    action: Action
    compensation: Action | None = None
    done: tuple[type[msgspec.Struct], ...] = ()
    """Reply events meaning the action succeeded; empty: the step is synchronous, done when
    its command succeeds (a `DomainError` from it fails the step; another error is retried
    per the saga's `handler_retry`, then fails the step)."""
    failed: tuple[type[msgspec.Struct], ...] = ()
    """Reply events meaning the action failed."""
    compensated: tuple[type[msgspec.Struct], ...] = ()
    """Reply events meaning the compensation succeeded; empty: the compensation is done when
    its command succeeds (errors count as failed attempts, as for the action)."""
    compensation_failed: tuple[type[msgspec.Struct], ...] = ()
    """Reply events meaning the compensation failed (it is retried)."""
    timeout: float = 30.0
    """Seconds to wait for a reply (of the action or of each compensation attempt)."""


# --- the saga's own framework events ------------------------------------------------


class StepStarted(msgspec.Struct, frozen=True, tag="rsaga.saga.StepStarted"):
    """The action of step `step` was issued."""

    step: str


class StepSucceeded(msgspec.Struct, frozen=True, tag="rsaga.saga.StepSucceeded"):
    """Step `step` is done."""

    step: str


class StepFailed(msgspec.Struct, frozen=True, tag="rsaga.saga.StepFailed"):
    """Step `step` failed; compensation begins."""

    step: str
    reason: str
    timed_out: bool = False


class CompensationStarted(msgspec.Struct, frozen=True, tag="rsaga.saga.CompensationStarted"):
    """Attempt `attempt` of step `step`'s compensation was issued."""

    step: str
    attempt: int


class CompensationAttemptFailed(
    msgspec.Struct, frozen=True, tag="rsaga.saga.CompensationAttemptFailed"
):
    """Attempt `attempt` of step `step`'s compensation failed; it will be retried."""

    step: str
    attempt: int
    reason: str


class StepCompensated(msgspec.Struct, frozen=True, tag="rsaga.saga.StepCompensated"):
    """Step `step` is undone."""

    step: str


class SagaCompleted(msgspec.Struct, frozen=True, tag="rsaga.saga.Completed"):
    """Every step is done."""


class SagaCompensated(msgspec.Struct, frozen=True, tag="rsaga.saga.Compensated"):
    """A step failed and every completed step was undone."""

    failed_step: str
    reason: str


class SagaCompensationFailed(msgspec.Struct, frozen=True, tag="rsaga.saga.CompensationFailed"):
    """A compensation kept failing: an operator must step in."""

    step: str
    reason: str


SAGA_EVENTS: tuple[type[msgspec.Struct], ...] = (
    StepStarted,
    StepSucceeded,
    StepFailed,
    CompensationStarted,
    CompensationAttemptFailed,
    StepCompensated,
    SagaCompleted,
    SagaCompensated,
    SagaCompensationFailed,
)


class SagaProgress(msgspec.Struct):
    """Where a saga is, folded from its stream."""

    phase: str = "new"
    """new, running, compensating, completed, compensated or compensation_failed."""
    current: str | None = None
    """The step running or being compensated."""
    succeeded: list[str] = msgspec.field(default_factory=list)
    """Steps done (and not yet compensated), in order."""
    to_compensate: list[str] = msgspec.field(default_factory=list)
    """Steps still to compensate, next first."""
    attempt: int = 0
    """Attempt of the current compensation."""
    failure: str = ""
    failed_step: str = ""


class _SagaState(msgspec.Struct):
    progress: SagaProgress
    user: Any


class Saga(ProcessManager[_SagaState]):
    """Base class of sagas. Subclasses set `name`, `steps`, `starts_with`, `events`.

    `events` lists every event that may trigger the saga: the events in
    `starts_with` and every reply type of the steps. Replies are copied onto the
    saga's stream, so `fold` can keep what compensations need (booking refs).
    """

    steps: ClassVar[tuple[Step, ...]] = ()
    starts_with: ClassVar[tuple[type[msgspec.Struct], ...]] = ()
    """Events that start a saga (an explicit `start` works too)."""
    compensation_retry: ClassVar[RetryPolicy] = ExponentialBackoff(
        base=1.0, cap=60.0, max_retries=5
    )
    """Backoff between attempts of a failing compensation."""

    # --- for subclasses -----------------------------------------------------------

    def initial_data(self) -> Any:
        """The user state of a new saga."""
        return None

    def fold(self, data: Any, event: RecordedEvent) -> Any:
        """Fold a user event (the start event, replies) into the user state."""
        return data

    def reply_step(self, event: RecordedEvent) -> str | None:
        """The step a reply belongs to, if replies of several steps share types."""
        return None

    # --- ProcessManager ---------------------------------------------------------------

    @classmethod
    def validate(cls) -> None:
        """Check the saga's definition."""
        super().validate()
        names = [step.name for step in cls.steps]
        if not names:
            raise ValidationError(f"saga {cls.name} has no steps")
        if len(set(names)) != len(names):
            raise ValidationError(f"saga {cls.name} has two steps with the same name")
        for step in cls.steps:
            if _STEP_NAME.fullmatch(step.name) is None:
                raise ValidationError(
                    f"saga {cls.name}: step name {step.name!r} must be 1-60 characters of "
                    "[A-Za-z0-9._-] (it names the step's timeouts)"
                )
            timeout = step.timeout
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                0 < timeout <= MAX_TIMEOUT_SECONDS
            ):
                raise ValidationError(
                    f"saga {cls.name}: step {step.name} timeout must be > 0 and at most "
                    f"{MAX_TIMEOUT_SECONDS:g} seconds, got {timeout!r}"
                )
        replies = [
            t for step in cls.steps
            for t in (*step.done, *step.failed, *step.compensated, *step.compensation_failed)
        ]
        cls.events = tuple(dict.fromkeys((*cls.events, *cls.starts_with, *replies)))
        cls.state_events = tuple(dict.fromkeys((*cls.state_events, *SAGA_EVENTS)))

    def initial_state(self) -> _SagaState:
        """A saga before anything happened."""
        return _SagaState(SagaProgress(), self.initial_data())

    def apply(self, state: _SagaState, event: RecordedEvent) -> _SagaState:
        """Fold the saga's framework events into its progress, the rest via `fold`."""
        p = state.progress
        match event.data:
            case StepStarted(step=step):
                p.phase, p.current = "running", step
            case StepSucceeded(step=step):
                p.succeeded.append(step)
            case StepFailed(step=step, reason=reason, timed_out=timed_out):
                state.progress = _failed(p, step, reason, timed_out=timed_out, saga=self)
            case CompensationStarted(step=step, attempt=attempt):
                p.current, p.attempt = step, attempt
            case StepCompensated(step=step):
                state.progress = _compensated(p, step)
            case CompensationAttemptFailed():
                pass
            case SagaCompleted():
                p.phase = "completed"
            case SagaCompensated():
                p.phase = "compensated"
            case SagaCompensationFailed():
                p.phase = "compensation_failed"
            case _:
                state.user = self.fold(state.user, event)
        return state

    def _step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise ValidationError(f"saga {self.name} has no step {name!r}")

    def _begin(self, index: int, data: Any, saga_id: str) -> Decision:
        step = self.steps[index]
        schedule = [Timeout(f"step:{step.name}", step.timeout)] if step.done else []
        return Decision(
            events=[StepStarted(step.name)],
            commands=[step.action(data, saga_id)],
            schedule=schedule,
            confirm=not step.done,
        )

    def _compensate_next(
        self, progress: SagaProgress, data: Any, saga_id: str, events: list[msgspec.Struct]
    ) -> Decision:
        """Start compensating the next step, or finish as compensated."""
        if not progress.to_compensate:
            return Decision(
                events=[*events, SagaCompensated(progress.failed_step, progress.failure)],
                compensated=f"{progress.failed_step} failed: {progress.failure}",
            )
        return self._attempt_compensation(progress.to_compensate[0], 1, data, saga_id, events)

    def _attempt_compensation(
        self, name: str, attempt: int, data: Any, saga_id: str, events: list[msgspec.Struct]
    ) -> Decision:
        step = self._step(name)
        assert step.compensation is not None
        schedule = [Timeout(f"compensate:{name}", step.timeout)] if step.compensated else []
        return Decision(
            events=[*events, CompensationStarted(name, attempt)],
            commands=[step.compensation(data, saga_id)],
            schedule=schedule,
            confirm=not step.compensated,
        )

    def _compensation_failed(
        self, progress: SagaProgress, reason: str, data: Any, saga_id: str
    ) -> Decision:
        name, attempt = progress.current or "", progress.attempt
        failed = CompensationAttemptFailed(name, attempt, reason)
        delay = self.compensation_retry.delay(attempt)
        if delay is None:
            why = f"compensation of {name} failed {attempt} times: {reason}"
            return Decision(
                events=[failed, SagaCompensationFailed(name, why)],
                fail=f"compensation failed: {why}",
                escalate=True,
            )
        return Decision(
            events=[failed], schedule=[Timeout(f"retry-compensation:{name}", delay, attempt + 1)]
        )

    def _after_success(self, progress: SagaProgress, data: Any, saga_id: str,
                       events: list[msgspec.Struct]) -> Decision:
        done = len(progress.succeeded) + 1
        if done == len(self.steps):
            return Decision(events=[*events, SagaCompleted()], complete=True)
        following = self._begin(done, data, saga_id)
        return msgspec.structs.replace(following, events=[*events, *following.events])

    def decide(self, state: _SagaState, trigger: Trigger, process: ProcessInfo) -> Decision:
        """The generic saga state machine."""
        p, data, saga_id = state.progress, state.user, process.process_id
        if p.phase == "new":
            if isinstance(trigger, StartTrigger):
                return self._begin(0, data, saga_id)
            if isinstance(trigger, EventTrigger) and isinstance(
                trigger.event.data, self.starts_with
            ):
                started = self._begin(0, self.fold(data, trigger.event), saga_id)
                return msgspec.structs.replace(
                    started, events=[trigger.event.data, *started.events]
                )
            return Decision()
        match trigger:
            case EventTrigger(event=event):
                return self._on_reply(p, event, data, saga_id)
            case TimeoutTrigger(name=name, attempt=attempt):
                kind, _, step = name.partition(":")
                if kind == "step" and p.phase == "running" and p.current == step:
                    reason = f"no reply within {self._step(step).timeout:g}s"
                    return self._compensate_next(
                        _failed(p, step, reason, timed_out=True, saga=self), data, saga_id,
                        [StepFailed(step, reason, timed_out=True)],
                    )
                if kind == "compensate" and p.phase == "compensating" and p.current == step:
                    reason = f"no reply within {self._step(step).timeout:g}s"
                    return self._compensation_failed(p, reason, data, saga_id)
                if kind == "retry-compensation" and p.phase == "compensating":
                    return self._attempt_compensation(step, attempt, data, saga_id, [])
            case SucceededTrigger():
                current = self._step(p.current) if p.current is not None else None
                if current is None:
                    return Decision()
                if p.phase == "running" and not current.done:
                    return self._after_success(p, data, saga_id, [StepSucceeded(current.name)])
                if p.phase == "compensating" and not current.compensated:
                    return self._compensate_next(
                        _compensated(p, current.name), data, saga_id,
                        [StepCompensated(current.name)],
                    )
            case RejectedTrigger(reason=reason):
                if p.phase == "running" and p.current is not None:
                    step = p.current
                    return self._compensate_next(
                        _failed(p, step, reason, timed_out=False, saga=self), data, saga_id,
                        [StepFailed(step, reason)],
                    )
                if p.phase == "compensating" and p.current is not None:
                    return self._compensation_failed(p, reason, data, saga_id)
        return Decision()

    def _on_reply(
        self, p: SagaProgress, event: RecordedEvent, data: Any, saga_id: str
    ) -> Decision:
        if p.current is None:
            return Decision()
        step = self._step(p.current)
        owner = self.reply_step(event)
        if owner is not None and owner != step.name:
            return Decision()
        reply = event.data
        data = self.fold(data, event)
        if p.phase == "running":
            if isinstance(reply, step.done):
                events: list[msgspec.Struct] = [reply, StepSucceeded(step.name)]
                decision = self._after_success(p, data, saga_id, events)
                return msgspec.structs.replace(
                    decision, cancel=[*decision.cancel, f"step:{step.name}"]
                )
            if isinstance(reply, step.failed):
                reason = getattr(reply, "reason", type(reply).__name__)
                decision = self._compensate_next(
                    _failed(p, step.name, reason, timed_out=False, saga=self), data, saga_id,
                    [reply, StepFailed(step.name, reason)],
                )
                return msgspec.structs.replace(
                    decision, cancel=[*decision.cancel, f"step:{step.name}"]
                )
        if p.phase == "compensating":
            if isinstance(reply, step.compensated):
                after = _compensated(p, step.name)
                decision = self._compensate_next(
                    after, data, saga_id, [reply, StepCompensated(step.name)]
                )
                return msgspec.structs.replace(
                    decision, cancel=[*decision.cancel, f"compensate:{step.name}"]
                )
            if isinstance(reply, step.compensation_failed):
                reason = getattr(reply, "reason", type(reply).__name__)
                decision = self._compensation_failed(p, reason, data, saga_id)
                return msgspec.structs.replace(
                    decision,
                    events=[reply, *decision.events],
                    cancel=[*decision.cancel, f"compensate:{step.name}"],
                )
        return Decision()

    def compensate(self, state: _SagaState, process: ProcessInfo, reason: str) -> Decision | None:
        """An operator's terminate with compensation: the running step fails (as if it timed
        out, so it is compensated too: its action may have taken effect), then every done
        step is compensated in reverse order and the saga ends compensated. A saga already
        compensating goes on as it was."""
        p, data = state.progress, state.user
        if p.phase == "compensating":
            return Decision()
        step = p.current
        if step is None:  # between steps: nothing runs, undo what is done
            return self._compensate_next(
                _failed(p, "", reason, timed_out=False, saga=self), data, process.process_id, []
            )
        decision = self._compensate_next(
            _failed(p, step, reason, timed_out=True, saga=self), data, process.process_id,
            [StepFailed(step, reason)],
        )
        return msgspec.structs.replace(decision, cancel=[*decision.cancel, f"step:{step}"])

    def report(self, event: msgspec.Struct, observer: Observer) -> None:
        """Compensations and compensation failures, for metrics."""
        if isinstance(event, StepCompensated):
            observer.saga_event(self.name, "compensated")
        elif isinstance(event, SagaCompensationFailed):
            observer.saga_event(self.name, "compensation_failed")


def _failed(
    p: SagaProgress, step: str, reason: str, *, timed_out: bool, saga: Saga
) -> SagaProgress:
    """The progress right after `StepFailed` (the decision is made before it is applied)."""
    undo = [*p.succeeded, step] if timed_out else list(p.succeeded)
    return SagaProgress(
        phase="compensating",
        succeeded=list(p.succeeded),
        to_compensate=[s for s in reversed(undo) if saga._step(s).compensation],
        failure=reason,
        failed_step=step,
    )


def _compensated(p: SagaProgress, step: str) -> SagaProgress:
    """The progress right after `StepCompensated`."""
    return msgspec.structs.replace(
        p,
        to_compensate=[s for s in p.to_compensate if s != step],
        succeeded=[s for s in p.succeeded if s != step],
        current=None,
        attempt=0,
    )

