"""Process correctness (issue 10): what a definition returns can never corrupt a stream,
every process ends or is visibly stuck, and no timeout is lost. Both backends."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import msgspec
import pytest
from redis.asyncio import Redis

from rsaga import EventRegistry, EventStore, Keyspace, RecordedEvent, StatelessCommand, StreamId
from rsaga.commands import Writes
from rsaga.deadletters import DeadLetter, DeadLetters
from rsaga.errors import DomainError, InvalidStreamId
from rsaga.processes import (
    AdvanceTrigger,
    Decision,
    ProcessCompleted,
    ProcessInfo,
    ProcessManager,
    Timeout,
    TimeoutFired,
    TimeoutScheduled,
    TimeoutTrigger,
    Trigger,
)
from rsaga.retry import FixedDelay
from rsaga.testing import Driver


class Poke(msgspec.Struct, frozen=True, tag="correctness.Poke"):
    """An outside event that triggers process `target`."""

    target: str


class Noted(msgspec.Struct, frozen=True, tag="correctness.Noted"):
    """An event the test process writes on its own stream."""

    what: str


class Unregistered(msgspec.Struct, frozen=True):
    """An event type nobody registered."""


class Note(StatelessCommand, frozen=True, tag="correctness.Note"):
    """Write a `Noted` to a stream."""

    stream: StreamId
    what: str

    def handle(self, state: None) -> Writes:
        return {self.stream: [Noted(self.what)]}


class Scripted(ProcessManager[list[str]]):
    """A process whose decisions the test sets: `decisions[n]` answers the n-th trigger."""

    name = "scripted"
    events = (Poke,)
    state_events = (Noted,)
    commands = (Note,)
    handler_retry = FixedDelay(interval=0.001, max_retries=4)
    decisions: ClassVar[list[Any]] = []
    correlation: ClassVar[Any] = None
    triggers: ClassVar[list[Trigger]] = []

    def correlate(self, event: RecordedEvent) -> str | None:
        if type(self).correlation is not None:
            value = type(self).correlation
            if isinstance(value, Exception):
                raise value
            return value  # type: ignore[no-any-return]
        target: str = event.data.target
        return target

    def initial_state(self) -> list[str]:
        return []

    def apply(self, state: list[str], event: RecordedEvent) -> list[str]:
        return [*state, event.data.what]

    def decide(self, state: list[str], trigger: Trigger, process: ProcessInfo) -> Decision:
        type(self).triggers.append(trigger)
        answer = type(self).decisions.pop(0) if type(self).decisions else Decision()
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]


def scripted(*decisions: Any, correlation: Any = None) -> Scripted:
    """A fresh `Scripted` type answering with `decisions`, in order."""

    class Run(Scripted):
        pass

    Run.decisions = list(decisions)
    Run.correlation = correlation
    Run.triggers = []
    return Run()


def make_store(redis: Redis, prefix: str) -> EventStore:
    return EventStore(redis, EventRegistry([Poke]), keyspace=Keyspace(prefix=prefix))


async def letters_of(store: EventStore) -> list[DeadLetter]:
    return await DeadLetters(store.redis, store.keyspace).list()


BAD_DECISIONS = [
    (Decision(fail=123), "Decision.fail"),  # type: ignore[arg-type]
    (Decision(fail=""), "Decision.fail"),
    (Decision(retry=5), "Decision.retry"),  # type: ignore[arg-type]
    (Decision(schedule=[Timeout(123, 1)]), "Decision.schedule[0].name"),  # type: ignore[arg-type]
    (Decision(schedule=[Timeout("x", at_ms=1.5)]), "Decision.schedule[0].at_ms"),  # type: ignore[arg-type]
    (Decision(schedule=[Timeout("x", 1, attempt="a")]), "Decision.schedule[0].attempt"),  # type: ignore[arg-type]
    (Decision(schedule=[Timeout("x", 1, attempt=0)]), "Decision.schedule[0].attempt"),
    (Decision(schedule=[Timeout("x", -math.inf)]), "Decision.schedule[0].after"),
    (Decision(schedule=[Timeout("x", math.nan)]), "Decision.schedule[0].after"),
    (Decision(schedule=[Timeout("x", math.inf)]), "Decision.schedule[0].after"),
    (Decision(schedule=[Timeout("x", 1e12)]), "Decision.schedule[0].after"),
    (Decision(schedule=[Timeout("a|b", 1)]), "Decision.schedule[0].name"),
    (Decision(schedule=[Timeout("a b", 1)]), "Decision.schedule[0].name"),
    (Decision(schedule=[Timeout("x", 1), Timeout("x", 2)]), "Decision.schedule[1].name"),
    (Decision(schedule=[Timeout("x", 1)], retry="x"), "Decision.retry"),
    (Decision(schedule=Timeout("x", 1)), "Decision.schedule"),  # type: ignore[arg-type]
    (Decision(cancel="wait"), "Decision.cancel"),
    (Decision(cancel=[7]), "Decision.cancel[0]"),  # type: ignore[list-item]
    (Decision(escalate=True), "Decision.escalate"),
    (Decision(complete="no"), "Decision.complete"),  # type: ignore[arg-type]
    (Decision(complete=True, fail="both"), "Decision.complete"),
    (Decision(events=[Unregistered()]), "Decision.events[0]"),
    (Decision(events=[ProcessCompleted()]), "Decision.events[0]"),
    (Decision(events=["text"]), "Decision.events[0]"),  # type: ignore[list-item]
    (Decision(commands=[Poke("1")]), "Decision.commands[0]"),  # type: ignore[list-item]
    (None, "decide()"),
    ({"complete": True}, "decide()"),
]


@pytest.mark.parametrize(("decision", "field"), BAD_DECISIONS, ids=lambda v: repr(v)[:40])
async def test_an_invalid_decision_writes_nothing_and_is_dead_lettered_at_once(
    redis: Redis, prefix: str, decision: Any, field: str
) -> None:
    store = make_store(redis, prefix)
    manager = scripted(decision, Decision(events=[Noted("fine")]))
    driver = Driver(store, [manager])
    await store.append("poke-1", [Poke("1")])
    await driver.run_until_idle()

    assert (await store.read("scripted-1")).events == []
    assert await redis.zcard(store.keyspace.timeouts(0)) == 0
    [letter] = await letters_of(store)
    assert letter.error_type == "DefinitionError"
    assert "process scripted 1" in letter.error
    assert field in letter.error
    assert letter.attempts == 1  # not retried: it cannot succeed
    assert len(type(manager).triggers) == 1

    # The stream stays usable: the next trigger works.
    await store.append("poke-1", [Poke("1")])
    await driver.run_until_idle()
    assert [e.data for e in (await store.read("scripted-1")).events][1:] == [Noted("fine")]


async def test_a_domain_error_in_decide_is_dead_lettered_without_retries(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix)
    manager = scripted(DomainError("no such customer"))
    driver = Driver(store, [manager])
    await store.append("poke-1", [Poke("1")])
    await driver.run_until_idle()
    [letter] = await letters_of(store)
    assert letter.error_type == "DefinitionError"
    assert "no such customer" in letter.error
    assert letter.attempts == 1
    assert len(type(manager).triggers) == 1
    assert (await store.read("scripted-1")).events == []


@pytest.mark.parametrize(
    "correlation",
    [123, b"1", "has space", InvalidStreamId("bad id"), DomainError("unknown")],
    ids=repr,
)
async def test_a_bad_correlation_is_dead_lettered_at_once_naming_the_process_type(
    redis: Redis, prefix: str, correlation: Any
) -> None:
    store = make_store(redis, prefix)
    manager = scripted(Decision(events=[Noted("x")]), correlation=correlation)
    driver = Driver(store, [manager])
    await store.append("poke-1", [Poke("1")])
    await driver.run_until_idle()
    [letter] = await letters_of(store)
    assert letter.error_type == "DefinitionError"
    assert "process scripted: correlate()" in letter.error
    assert letter.attempts == 1
    assert type(manager).triggers == []


async def test_schedule_and_cancel_of_one_name_in_one_decision_reschedule_it(
    redis: Redis, prefix: str
) -> None:
    """The cancel applies first: the new timeout replaces the pending one."""
    store = make_store(redis, prefix)
    manager = scripted(
        Decision(schedule=[Timeout("wait", 10)]),
        Decision(cancel=["wait"], schedule=[Timeout("wait", 20)]),
        Decision(complete=True),
    )
    driver = Driver(store, [manager])
    await driver.processes.advance("scripted", "1")
    await driver.processes.advance("scripted", "1")
    await driver.advance(15)
    assert len(type(manager).triggers) == 2  # the first timeout did not fire
    await driver.advance(10)
    fired = [t for t in type(manager).triggers if isinstance(t, TimeoutTrigger)]
    assert [t.name for t in fired] == ["wait"]
    events = (await store.read("scripted-1")).events
    scheduled = [e.data for e in events if isinstance(e.data, TimeoutScheduled)]
    [done] = [e.data for e in events if isinstance(e.data, TimeoutFired)]
    assert done.token == scheduled[-1].token
    assert isinstance(events[-1].data, ProcessCompleted)
    assert isinstance(type(manager).triggers[0], AdvanceTrigger)
