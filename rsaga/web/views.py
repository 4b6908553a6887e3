"""What the console derives from a process's history for its detail page."""

from __future__ import annotations

from typing import Any

import msgspec

from rsaga.inspect import ProcessView
from rsaga.process.events import CommandsIssued
from rsaga.process.saga import (
    CompensationAttemptFailed,
    CompensationStarted,
    StepCompensated,
    StepFailed,
    StepStarted,
    StepSucceeded,
)


class StepView(msgspec.Struct):
    """One saga step as the diagram shows it."""

    name: str
    state: str
    """"running", "done", "failed", "compensating", "compensated"."""
    compensation_attempts: int = 0


class IssuedView(msgspec.Struct):
    """A command a process issued, with the version of the event that recorded it."""

    version: int
    name: str
    data: Any


class ProcessDetail(msgspec.Struct):
    """The parts of a process view the detail page shows beside its timeline."""

    steps: list[StepView]
    commands: list[IssuedView]
    correlation_ids: list[str]


def _payload(raw: msgspec.Raw) -> Any:
    try:
        return msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        return f"(undecodable, {len(raw)} bytes)"


def shown(data: Any) -> Any:
    """`data` as a page shows it: recorded commands decoded, without the type tag the page
    already shows beside it."""
    if isinstance(data, CommandsIssued):
        return {"commands": [{"type": c.type, "data": _payload(c.payload)} for c in data.commands]}
    if isinstance(data, msgspec.Struct):
        plain = msgspec.to_builtins(data, enc_hook=str)
        if isinstance(plain, dict):
            plain.pop("type", None)
        return plain
    return data


def process_detail(view: ProcessView) -> ProcessDetail:
    """The saga's steps in order with their state, the commands issued and the correlation ids."""
    steps: dict[str, StepView] = {}
    commands: list[IssuedView] = []
    correlations: list[str] = []
    for event in view.events:
        if event.correlation_id and event.correlation_id not in correlations:
            correlations.append(event.correlation_id)
        match event.data:
            case StepStarted(step=step):
                steps[step] = StepView(step, "running")
            case StepSucceeded(step=step) if step in steps:
                steps[step].state = "done"
            case StepFailed(step=step) if step in steps:
                steps[step].state = "failed"
            case CompensationStarted(step=step) if step in steps:
                steps[step].state = "compensating"
            case CompensationAttemptFailed(step=step) if step in steps:
                steps[step].compensation_attempts += 1
            case StepCompensated(step=step) if step in steps:
                steps[step].state = "compensated"
            case CommandsIssued(commands=issued):
                commands += [IssuedView(event.version, c.type, _payload(c.payload)) for c in issued]
    return ProcessDetail(list(steps.values()), commands, correlations)
