"""Handlers and a process manager for the worker benchmarks of `run.py`.

Real ``rsaga worker`` processes import this module (``PYTHONPATH=benchmarks``,
``RSAGA_HANDLERS=plugins:NoopHandler`` and so on); `run.py` imports it for the
event types it appends and reads back.

- `NoopHandler` (``bench-noop``) does nothing with a `Ping`.
- `CommandHandler` (``bench-command``) executes one `Record` per `Ping`: read
  ``seen-<stream>``, append `Seen(version)` to it (once: a version already
  recorded is skipped).
- Both push the latency of a `Ping` with ``sample=True`` (handler's clock minus
  the event's occurred-at, in ms) to the list `latency_key`.
- `TimerProbe` (``bench-timer``) is a process that, started with an absolute
  due time in ms, schedules one timeout for then; when it fires, `decide`
  records how late it runs (`Fired`, on the process stream) and completes.
"""

from __future__ import annotations

import time

import msgspec

from rsaga import Command, RecordedEvent, StreamId, Writes
from rsaga.handlers import EventHandler, HandlerContext
from rsaga.processes import (
    Decision,
    ProcessInfo,
    ProcessManager,
    StartTrigger,
    Timeout,
    TimeoutTrigger,
    Trigger,
)
from rsaga.retry import FixedDelay


class Ping(msgspec.Struct, frozen=True):
    """The event the handler benchmarks append."""

    sample: bool = False
    """Handlers record this event's latency."""


class Seen(msgspec.Struct, frozen=True):
    """`CommandHandler` handled version `version` of the source stream."""

    version: int


class Record(Command[int], frozen=True):
    """Append Seen(version) to `target` unless that version is recorded already."""

    target: StreamId
    version: int

    def initial_state(self) -> int:
        return 0

    def apply(self, state: int, event: RecordedEvent) -> int:
        return int(event.data.version)

    def handle(self, state: int) -> Writes:
        if self.version <= state:
            return {}
        return {self.target: [Seen(self.version)]}


def latency_key(prefix: str) -> str:
    """The Redis list sampled latencies go to (ms, as text)."""
    return f"{prefix}:bench:latency"


async def _sample(event: RecordedEvent, ctx: HandlerContext) -> None:
    if event.data.sample:
        latency_ms = time.time() * 1000 - event.occurred_at.timestamp() * 1000
        await ctx.store.redis.rpush(latency_key(ctx.store.keyspace.prefix), f"{latency_ms:.3f}")


class NoopHandler(EventHandler):
    """Does nothing (but record sampled latencies)."""

    name = "bench-noop"
    events = (Ping,)
    retry = FixedDelay(interval=0.01, max_retries=3)

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        await _sample(event, ctx)


class CommandHandler(EventHandler):
    """Executes one `Record` per event."""

    name = "bench-command"
    events = (Ping,)
    decodes = (Seen,)
    retry = FixedDelay(interval=0.01, max_retries=3)

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        await ctx.execute(Record(target=StreamId(f"seen-{event.stream_id}"), version=event.version))
        await _sample(event, ctx)


# --- timeouts ------------------------------------------------------------------------


class Fired(msgspec.Struct, frozen=True):
    """The probe's timeout fired `lateness_ms` after its due time (by the deciding clock)."""

    lateness_ms: float
    due_ms: int


PROBE_TIMEOUT = "probe"


class TimerProbe(ProcessManager[None]):
    """Start with `data` = due time (ms since the epoch); fires once, records lateness."""

    name = "bench-timer"
    state_events = (Fired,)

    def correlate(self, event: RecordedEvent) -> str | None:
        return None

    def initial_state(self) -> None:
        return None

    def decide(self, state: None, trigger: Trigger, process: ProcessInfo) -> Decision:
        match trigger:
            case StartTrigger(data=int(due_ms)):
                return Decision(schedule=[Timeout(PROBE_TIMEOUT, at_ms=due_ms)])
            case TimeoutTrigger(name=name, due_ms=due_ms) if name == PROBE_TIMEOUT:
                lateness = time.time() * 1000 - due_ms
                return Decision(events=[Fired(round(lateness, 3), due_ms)], complete=True)
        return Decision()
