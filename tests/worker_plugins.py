"""Handlers used by the worker tests, in-process and in real `rsaga worker` processes.

`Recorder` makes its effect once: for event N of stream S it executes `Record`,
which appends `Seen(N)` to ``seen-S`` only if the last one seen there is N-1.
So ``seen-S`` ends as exactly 1..n if and only if every event was handled, in
order, and no effect was applied twice.
"""

from __future__ import annotations

import os
import random
import time

import anyio
import msgspec
from redis.asyncio import Redis

from rsaga import Command, RecordedEvent, StatelessCommand, StreamId, Writes
from rsaga.handlers import EventHandler, HandlerContext
from rsaga.processes import (
    Decision,
    EventTrigger,
    ProcessInfo,
    ProcessManager,
    Timeout,
    TimeoutTrigger,
    Trigger,
)
from rsaga.retry import FixedDelay


class Ping(msgspec.Struct, frozen=True):
    """The event the tests append."""

    n: int = 0
    payload: str = ""


class Other(msgspec.Struct, frozen=True):
    """An event no test handler wants."""


class Seen(msgspec.Struct, frozen=True):
    """`Recorder` handled version `version` of the source stream."""

    version: int


class Record(Command[int], frozen=True):
    """Append Seen(version) to `target` iff it is the next version expected there."""

    target: StreamId
    version: int

    def initial_state(self) -> int:
        return 0

    def apply(self, state: int, event: RecordedEvent) -> int:
        return int(event.data.version)

    def handle(self, state: int) -> Writes:
        if self.version <= state:
            return {}
        if self.version != state + 1:
            raise RuntimeError(f"{self.target}: got version {self.version} after {state}")
        return {self.target: [Seen(self.version)]}


class Recorder(EventHandler):
    """Records every Ping once, in per-stream order (see module docstring)."""

    name = "recorder"
    events = (Ping,)
    decodes = (Seen,)
    claim_timeout = float(os.environ.get("TEST_CLAIM_TIMEOUT", "30"))
    retry = FixedDelay(interval=0.01, max_retries=3)

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        jitter = float(os.environ.get("TEST_HANDLER_JITTER", "0"))
        if jitter:
            await anyio.sleep(random.random() * jitter)
        await ctx.execute(Record(target=StreamId(f"seen-{event.stream_id}"), version=event.version))


class Flaky(EventHandler):
    """Fails unless the Redis key ``<prefix>:fixed`` exists (tests "fix" it by setting it)."""

    name = "flaky"
    events = (Ping,)
    retry = FixedDelay(interval=0.0, max_retries=2)
    calls: list[int] = []

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        redis: Redis = ctx.store.redis
        type(self).calls.append(event.version)
        if not await redis.exists(f"{ctx.store.keyspace.prefix}:fixed"):
            raise ValueError(f"cannot handle {event.stream_id}@{event.version} yet")
        await redis.incr(f"{ctx.store.keyspace.prefix}:flaky-done")


class Killer(EventHandler):
    """Kills its own process on a Ping whose payload is "poison" (a crash every delivery)."""

    name = "killer"
    events = (Ping,)
    decodes = (Seen,)
    claim_timeout = float(os.environ.get("TEST_CLAIM_TIMEOUT", "30"))

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        if event.data.payload == "poison":
            os._exit(3)
        await ctx.execute(Record(target=StreamId(f"seen-{event.stream_id}"), version=event.version))


class AlarmSet(msgspec.Struct, frozen=True):
    """Start an alarm process that rings at `at_ms`."""

    alarm_id: str
    at_ms: int


class Rang(msgspec.Struct, frozen=True):
    """The effect of a ringing alarm, on stream ``bell-<id>``."""

    alarm_id: str


class Ring(StatelessCommand, frozen=True, tag="tests.Ring"):
    """Append Rang to the bell stream (applied once per ring by its idempotency key)."""

    bell: StreamId
    alarm_id: str


    def handle(self, state: None) -> Writes:
        return {self.bell: [Rang(self.alarm_id)]}


class Alarm(ProcessManager[None]):
    """Rings once at the time it was set for, then completes."""

    name = "alarm"
    events = (AlarmSet,)
    commands = (Ring,)
    decodes = (Rang,)
    claim_timeout = float(os.environ.get("TEST_CLAIM_TIMEOUT", "30"))

    def correlate(self, event: RecordedEvent) -> str | None:
        return str(event.data.alarm_id)

    def initial_state(self) -> None:
        return None

    def decide(self, state: None, trigger: Trigger, process: ProcessInfo) -> Decision:
        if isinstance(trigger, EventTrigger) and process.status == "new":
            return Decision(schedule=[Timeout("ring", at_ms=trigger.event.data.at_ms)])
        if isinstance(trigger, TimeoutTrigger):
            delay = float(os.environ.get("TEST_RING_DELAY", "0"))
            if delay:
                time.sleep(delay)  # a slow effect, so a kill lands mid-timeout
            bell = StreamId(f"bell-{process.process_id}")
            return Decision(commands=[Ring(bell=bell, alarm_id=process.process_id)], complete=True)
        return Decision()


class Sleepy(EventHandler):
    """Takes a minute per event: for shutdown tests."""

    name = "sleepy"
    events = (Ping,)

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        await anyio.sleep(60)
