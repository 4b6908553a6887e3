"""Process types for the health-check and search tests: each has a twin with its own
(lax) thresholds, so a test can show a per-type threshold winning over the default."""

from __future__ import annotations

from typing import Any

import msgspec

from rsaga.processes import (
    AdvanceTrigger,
    Decision,
    ProcessInfo,
    ProcessManager,
    StartTrigger,
    TimeoutTrigger,
    Trigger,
)
from rsaga.retry import ExponentialBackoff


class Stepped(msgspec.Struct, frozen=True):
    """Progress of a test process."""

    note: str = ""


class Healed(msgspec.Struct, frozen=True):
    """The step that kept failing will succeed from now on."""


class Errand(ProcessManager[bool]):
    """Started and driven explicitly: "fail" makes its "charge" step retry until "heal",
    "done" completes it. The state says whether it is healed."""

    name = "errand"
    state_events = (Stepped, Healed)
    retry = ExponentialBackoff(base=1.0, cap=1.0, max_retries=50)

    def initial_state(self) -> bool:
        return False

    def apply(self, state: bool, event: Any) -> bool:
        return state or isinstance(event.data, Healed)

    def decide(self, state: bool, trigger: Trigger, process: ProcessInfo) -> Decision:
        match trigger:
            case StartTrigger():
                return Decision(events=[Stepped("started")])
            case AdvanceTrigger(data="fail"):
                return Decision(retry="charge")
            case AdvanceTrigger(data="heal"):
                return Decision(events=[Healed()])
            case AdvanceTrigger(data="done"):
                return Decision(complete=True)
            case TimeoutTrigger(name="charge"):
                return Decision(events=[Stepped("charged")]) if state else Decision(retry="charge")
        return Decision()


class PatientErrand(Errand):
    """An errand whose own thresholds are lax: slow, old and retried are normal for it."""

    name = "patient-errand"
    average_duration_warning = 3600.0
    max_process_age = 3600.0
    max_retry_count = 100
