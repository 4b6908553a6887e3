"""Process correctness (issue 10): what a definition returns can never corrupt a stream,
every process ends or is visibly stuck, and no timeout is lost. Both backends."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import anyio
import msgspec
import pytest
from prometheus_client import generate_latest
from redis.asyncio import Redis

from rsaga import EventRegistry, EventStore, Keyspace, RecordedEvent, StatelessCommand, StreamId
from rsaga.cli import main
from rsaga.commands import Writes
from rsaga.config import HealthSettings
from rsaga.deadletters import DeadLetter, DeadLetters
from rsaga.errors import DomainError, InvalidStreamId, ValidationError
from rsaga.executor import Executor
from rsaga.health import health_report
from rsaga.inspect import list_processes, show_process
from rsaga.metrics import PrometheusObserver
from rsaga.observe import NO_OBSERVER, Observer
from rsaga.processes import (
    AdvanceTrigger,
    Decision,
    ProcessCompensated,
    ProcessCompleted,
    ProcessFailed,
    ProcessInfo,
    ProcessManager,
    ProcessRunner,
    Timeout,
    TimeoutFired,
    TimeoutScheduled,
    TimeoutTrigger,
    Trigger,
)
from rsaga.retry import FixedDelay
from rsaga.sagas import Saga, Step, StepFailed
from rsaga.testing import Driver, ManualClock


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


# --- bug 1: synchronous saga steps ---------------------------------------------------------


class Reserved(msgspec.Struct, frozen=True, tag="correctness.Reserved"):
    """A booking service recorded a reservation (or, with `undo`, its cancellation)."""

    what: str
    undo: bool = False


class Refused(msgspec.Struct, frozen=True, tag="correctness.Refused"):
    """An asynchronous service refused (a failure reply)."""

    trip: str
    reason: str = "sold out"


class Reserve(StatelessCommand, frozen=True, tag="correctness.Reserve"):
    """Book (or cancel) `what`; `outcome` "domain" refuses, "crash" raises, else succeeds."""

    stream: StreamId
    what: str
    undo: bool = False
    outcome: str = "ok"
    calls: ClassVar[list[str]] = []

    def handle(self, state: None) -> Writes:
        Reserve.calls.append(f"{'undo ' if self.undo else ''}{self.what}")
        if self.outcome == "domain":
            raise DomainError(f"{self.what} refused")
        if self.outcome == "crash":
            raise RuntimeError(f"{self.what} service down")
        return {self.stream: [Reserved(self.what, self.undo)]}


class TripStarted(msgspec.Struct, frozen=True, tag="correctness.TripStarted"):
    """Starts a `SyncTrip`; `outcomes` maps a step to how its command ends."""

    trip: str
    outcomes: dict[str, str] = {}


def _action(what: str, *, undo: bool = False) -> Any:
    def build(data: Any, trip: str) -> Reserve:
        outcomes = data.outcomes if data is not None else {}
        outcome = outcomes.get(f"undo {what}" if undo else what, "ok")
        return Reserve(stream=StreamId(f"{what}-{trip}"), what=what, undo=undo, outcome=outcome)

    return build


class SyncTrip(Saga):
    """Hotel, flight and car, each a plain command; cancellations are plain commands too."""

    name = "sync-trip"
    steps = tuple(
        Step(name=what, action=_action(what), compensation=_action(what, undo=True))
        for what in ("hotel", "flight", "car")
    )
    starts_with = (TripStarted,)
    commands = (Reserve,)
    decodes = (Reserved,)
    handler_retry = FixedDelay(interval=0.001, max_retries=2)
    compensation_retry = FixedDelay(interval=1.0, max_retries=2)

    def correlate(self, event: RecordedEvent) -> str | None:
        trip: str | None = getattr(event.data, "trip", None)
        return trip

    def fold(self, data: Any, event: RecordedEvent) -> Any:
        return event.data if isinstance(event.data, TripStarted) else data


class HalfAsyncTrip(SyncTrip):
    """The flight waits for a reply; its cancellation and the hotel's are synchronous."""

    name = "half-async-trip"
    steps = (
        SyncTrip.steps[0],
        Step(
            name="flight", action=_action("flight"), compensation=_action("flight", undo=True),
            done=(Reserved,), failed=(Refused,), timeout=60,
        ),
    )
    events = (Refused,)


def saga_steps(events: list[RecordedEvent]) -> list[str]:
    """The saga's step events as 'Kind step'."""
    return [
        f"{type(e.data).__name__} {getattr(e.data, 'step', '')}".strip()
        for e in events
        if type(e.data).__module__ == "rsaga.process.saga"
    ]


async def run_trip(
    redis: Redis,
    prefix: str,
    saga: Saga,
    outcomes: dict[str, str],
    *,
    observer: Observer = NO_OBSERVER,
) -> tuple[EventStore, Driver, list[RecordedEvent]]:
    Reserve.calls = []
    store = EventStore(
        redis, EventRegistry([TripStarted, Refused]), keyspace=Keyspace(prefix=prefix)
    )
    driver = Driver(store, [saga])
    driver.executor.observer = observer
    await store.append("trip-1", [TripStarted("1", outcomes)])
    await driver.run_until_idle()
    return store, driver, (await store.read(f"{saga.name}-1")).events


async def test_a_saga_of_synchronous_steps_runs_to_completion(redis: Redis, prefix: str) -> None:
    _, _, events = await run_trip(redis, prefix, SyncTrip(), {})
    assert saga_steps(events) == [
        "StepStarted hotel", "StepSucceeded hotel", "StepStarted flight",
        "StepSucceeded flight", "StepStarted car", "StepSucceeded car", "SagaCompleted",
    ]
    assert Reserve.calls == ["hotel", "flight", "car"]
    assert isinstance(events[-1].data, ProcessCompleted)


async def test_a_synchronous_step_refused_compensates_the_steps_before_it(
    redis: Redis, prefix: str
) -> None:
    _, _, events = await run_trip(redis, prefix, SyncTrip(), {"car": "domain"})
    assert Reserve.calls == ["hotel", "flight", "car", "undo flight", "undo hotel"]
    assert saga_steps(events)[-6:] == [
        "StepFailed car", "CompensationStarted flight", "StepCompensated flight",
        "CompensationStarted hotel", "StepCompensated hotel", "SagaCompensated",
    ]


async def test_a_synchronous_step_that_keeps_crashing_is_retried_then_fails(
    redis: Redis, prefix: str
) -> None:
    store, _, events = await run_trip(redis, prefix, SyncTrip(), {"flight": "crash"})
    retries = SyncTrip.handler_retry.max_retries
    assert Reserve.calls == ["hotel", *["flight"] * (retries + 1), "undo hotel"]
    [failed] = [e.data for e in events if isinstance(e.data, StepFailed)]
    assert failed.step == "flight"
    assert "flight service down" in failed.reason
    assert saga_steps(events)[-1] == "SagaCompensated"
    assert await letters_of(store) == []


async def test_a_synchronous_compensation_that_fails_is_retried_with_backoff(
    redis: Redis, prefix: str
) -> None:
    _, driver, events = await run_trip(
        redis, prefix, SyncTrip(), {"car": "domain", "undo flight": "domain"}
    )
    assert saga_steps(events)[-1] == "CompensationAttemptFailed flight"
    for _ in range(SyncTrip.compensation_retry.max_retries):
        await driver.advance(1.0)
    events = (await driver.store.read("sync-trip-1")).events
    assert Reserve.calls.count("undo flight") == 3
    assert "undo hotel" not in Reserve.calls  # escalation leaves the rest uncompensated
    assert saga_steps(events)[-1] == "SagaCompensationFailed flight"


async def test_an_asynchronous_step_with_a_synchronous_compensation_compensates(
    redis: Redis, prefix: str
) -> None:
    store, driver, events = await run_trip(redis, prefix, HalfAsyncTrip(), {})
    assert saga_steps(events)[-1] == "StepStarted flight"
    await store.append("flight-1", [Refused("1")])
    await driver.run_until_idle()
    events = (await store.read("half-async-trip-1")).events
    assert Reserve.calls == ["hotel", "flight", "undo hotel"]
    assert saga_steps(events)[-4:] == [
        "StepFailed flight", "CompensationStarted hotel", "StepCompensated hotel",
        "SagaCompensated",
    ]


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf])
def test_a_step_timeout_that_is_not_positive_is_refused_when_the_saga_is_defined(
    timeout: float,
) -> None:
    class Broken(SyncTrip):
        name = "broken"
        steps = (Step(name="x", action=_action("x"), done=(Reserved,), timeout=timeout),)

    with pytest.raises(ValidationError, match="timeout must be > 0"):
        Broken.validate()


# --- bug 2: dead-lettered timeouts are replayable ---------------------------------------


async def test_a_dead_lettered_timeout_fires_again_when_replayed(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix)
    manager = scripted(
        Decision(schedule=[Timeout("wait", 5)]),
        Decision(fail=123),  # type: ignore[arg-type]  # the bug, at the timeout
        Decision(complete=True),  # the fixed definition, after the replay
    )
    driver = Driver(store, [manager])
    await driver.processes.advance("scripted", "1")
    await driver.advance(5)
    assert await redis.zcard(store.keyspace.timeouts(0)) == 0  # moved to the due stream
    [letter] = await letters_of(store)
    assert (letter.stream_id, letter.timeout) == ("scripted-1", "wait")

    letters = DeadLetters(redis, store.keyspace)
    report = await letters.replay_all()
    assert report.replayed == [letter.id]
    assert report.failed == {}
    await driver.run_until_idle()
    triggers = type(manager).triggers
    assert [type(t).__name__ for t in triggers] == [
        "AdvanceTrigger", "TimeoutTrigger", "TimeoutTrigger",
    ]
    events = (await store.read("scripted-1")).events
    assert [type(e.data).__name__ for e in events][-2:] == ["TimeoutFired", "ProcessCompleted"]
    assert await letters.count() == 0


async def test_replay_all_goes_on_past_a_letter_it_cannot_replay(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix)
    manager = scripted(
        Decision(fail="gave up", escalate=True),  # process 1: a report, not replayable
        DomainError("not yet"),  # process 2: replayable
        Decision(complete=True),
    )
    driver = Driver(store, [manager])
    await store.append("poke-1", [Poke("1")])
    await driver.run_until_idle()
    await store.append("poke-2", [Poke("2")])
    await driver.run_until_idle()
    by_type = {letter.error_type: letter for letter in await letters_of(store)}
    report_letter, event_letter = by_type["ProcessFailed"], by_type["DefinitionError"]

    report = await DeadLetters(redis, store.keyspace).replay_all()
    assert report.replayed == [event_letter.id]
    assert list(report.failed) == [report_letter.id]
    assert "reports a failed process" in report.failed[report_letter.id]
    await driver.run_until_idle()
    assert isinstance((await store.read("scripted-2")).events[-1].data, ProcessCompleted)


def test_cli_dlq_replay_all_reports_what_it_cannot_replay_and_exits_1(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
    prefix: str,
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    monkeypatch.setenv("RSAGA_PREFIX", prefix)
    keyspace = Keyspace(prefix=prefix)

    async def seed() -> list[str]:
        redis = Redis.from_url(real_redis_url)
        for fields in (
            {"handler": "h", "error_type": "ProcessFailed", "error": "report"},
            {"handler": "h", "s": "acct", "v": "1", "d": b"x", "error_type": "ValueError"},
        ):
            await redis.xadd(keyspace.dead_letters(0), fields)  # type: ignore[arg-type]
        ids = [i.decode() for i, _ in await redis.xrange(keyspace.dead_letters(0))]
        await redis.aclose()
        return ids

    ids = anyio.run(seed)
    assert main(["dlq", "replay", "--all"]) == 1
    out = capsys.readouterr().out
    assert "replayed 1" in out
    assert f"could not replay {ids[0]}" in out


# --- bug 5: timeouts keep the correlation ----------------------------------------------


async def test_a_timeout_step_keeps_the_correlation_and_is_caused_by_the_timeout(
    redis: Redis, prefix: str
) -> None:
    store = make_store(redis, prefix)
    manager = scripted(
        Decision(schedule=[Timeout("wait", 5)]),
        Decision(
            events=[Noted("late")],
            commands=[Note(stream=StreamId("note-1"), what="x")],
            schedule=[Timeout("again", 5)],
        ),
        Decision(complete=True),
    )
    driver = Driver(store, [manager])
    await store.append("poke-1", [Poke("1")], correlation_id="corr-1")
    await driver.run_until_idle()
    await driver.advance(5)
    await driver.advance(5)
    events = (await store.read("scripted-1")).events
    tokens = {e.data.name: e.data.token for e in events if isinstance(e.data, TimeoutScheduled)}
    assert {e.correlation_id for e in events} == {"corr-1"}
    fired = [e for e in events if isinstance(e.data, TimeoutFired | Noted | ProcessCompleted)]
    assert [e.causation_id for e in fired] == [
        tokens["wait"], tokens["wait"], tokens["again"], tokens["again"],
    ]
    [note] = (await store.read("note-1")).events
    assert note.correlation_id == "corr-1"


# --- bug 9: compensated is its own end state ------------------------------------------


async def test_a_cleanly_compensated_saga_ends_compensated_not_failed(
    redis: Redis, prefix: str
) -> None:
    observer = PrometheusObserver()
    store, _, events = await run_trip(
        redis, prefix, SyncTrip(), {"car": "domain"}, observer=observer
    )
    assert events[-1].data == ProcessCompensated("car failed: car refused", 0)
    stats = await redis.hgetall(store.keyspace.process_stats(0, "sync-trip"))
    assert (stats[b"started"], stats[b"compensated"]) == (b"1", b"1")
    assert b"failed" not in stats
    ks = store.keyspace
    assert await redis.zrange(ks.finished_processes(0, "sync-trip", "compensated"), 0, -1) == [
        b"sync-trip-1"
    ]
    rows = await list_processes(redis, ks, types=["sync-trip"], state="compensated")
    assert [(r.stream_id, r.state) for r in rows] == [("sync-trip-1", "compensated")]
    assert await list_processes(redis, ks, types=["sync-trip"], state="failed") == []
    view = await show_process(store, "sync-trip-1")
    assert view is not None
    assert view.status == "compensated"
    report = await health_report(redis, ks, HealthSettings(min_finished=1))
    [figures] = report.processes
    assert (figures.compensated, figures.failed, figures.failure_rate) == (1, 0, 0.0)
    metrics = generate_latest(observer.registry).decode()
    assert 'rsaga_processes_compensated_total{process_type="sync-trip"} 1.0' in metrics
    assert 'rsaga_processes_failed_total{process_type="sync-trip"}' not in metrics
    assert 'rsaga_commands_total{command="sync-trip",outcome="written"}' in metrics
    assert "_Step" not in metrics


async def test_a_saga_whose_compensation_fails_ends_failed(redis: Redis, prefix: str) -> None:
    _, driver, _ = await run_trip(
        redis, prefix, SyncTrip(), {"car": "domain", "undo flight": "domain"}
    )
    for _ in range(SyncTrip.compensation_retry.max_retries):
        await driver.advance(1.0)
    events = (await driver.store.read("sync-trip-1")).events
    assert isinstance(events[-1].data, ProcessFailed)
    stats = await redis.hgetall(driver.store.keyspace.process_stats(0, "sync-trip"))
    assert stats[b"failed"] == b"1"
    assert b"compensated" not in stats


# --- bug 6: timeouts reach only workers that run their process type ---------------------


async def test_workers_of_different_process_types_each_get_only_their_timeouts(
    redis: Redis, prefix: str
) -> None:
    mine = scripted(Decision(schedule=[Timeout("wait", 5)]), Decision(complete=True))

    class Other(Scripted):
        name = "other"

    Other.decisions = [Decision(schedule=[Timeout("wait", 5)]), Decision(complete=True)]
    Other.triggers = []
    clock = ManualClock()
    pool_a = Driver(make_store(redis, prefix), [mine], clock=clock)
    pool_b = Driver(make_store(redis, prefix), [Other()], clock=clock)
    await pool_a.processes.advance("scripted", "1")
    await pool_b.processes.advance("other", "1")

    await pool_a.advance(5)  # its scheduler moves both due timeouts
    assert await letters_of(pool_a.store) == []
    assert [type(t).__name__ for t in type(mine).triggers] == ["AdvanceTrigger", "TimeoutTrigger"]
    assert len(Other.triggers) == 1  # not fired yet: no worker of its type ran

    await pool_b.run_until_idle()  # the first worker of the type picks it up
    assert [type(t).__name__ for t in Other.triggers] == ["AdvanceTrigger", "TimeoutTrigger"]
    for stream in ("scripted-1", "other-1"):
        events = (await pool_a.store.read(stream)).events
        assert isinstance(events[-1].data, ProcessCompleted)
    assert await letters_of(pool_a.store) == []


# --- bug 7: a process waiting on a timer is not stuck --------------------------------------


async def test_a_process_waiting_on_a_future_timeout_is_not_stuck(
    redis: Redis, prefix: str
) -> None:
    """Stuck: no pending timeout and no progress for stuck_after, or a timeout overdue
    by more than overdue_after. Real clocks: the index uses the Redis server's time."""
    store = make_store(redis, prefix)
    manager = scripted(
        Decision(schedule=[Timeout("month", 30 * 86400)]),  # waits 30 days
        Decision(events=[Noted("no timer")]),  # idle, nothing pending
        Decision(schedule=[Timeout("soon", at_ms=1)]),  # a timeout long overdue
    )
    runner = ProcessRunner(Executor(store), [manager])
    thresholds = HealthSettings(stuck_after=0.2, overdue_after=60)
    for process_id in ("waiting", "idle", "overdue"):
        await runner.advance("scripted", process_id)
    await anyio.sleep(0.3)

    report = await health_report(redis, store.keyspace, thresholds)
    [figures] = report.processes
    assert (figures.active, figures.stuck) == (3, 2)
    stuck = await list_processes(
        redis, store.keyspace, types=["scripted"], state="stuck", stuck_after=0.2,
        overdue_after=60,
    )
    assert sorted(r.stream_id for r in stuck) == ["scripted-idle", "scripted-overdue"]
    listed = await list_processes(redis, store.keyspace, types=["scripted"])
    assert {r.stream_id: r.state for r in listed} == {
        "scripted-waiting": "waiting", "scripted-overdue": "waiting", "scripted-idle": "active",
    }

    report = await health_report(redis, store.keyspace, HealthSettings(stuck_after=3600))
    assert report.processes[0].stuck == 1  # only the overdue timeout


# --- bug 8: a timeout loop fails the process instead of burning a core ---------------------


def loop(steps: int) -> list[Decision]:
    """Decisions that reschedule a 0 s timeout `steps` times, then stop."""
    return [Decision(schedule=[Timeout("again", 0)])] * steps + [Decision()]


async def test_a_timeout_that_reschedules_itself_at_0s_fails_the_process(
    redis: Redis, prefix: str
) -> None:
    class Looping(Scripted):
        name = "looping"
        max_unprompted_steps = 10

    Looping.decisions = [*loop(8), *loop(8), *loop(30)]
    Looping.triggers = []
    observer = PrometheusObserver()
    store = make_store(redis, prefix)
    driver = Driver(store, [Looping()])
    driver.executor.observer = observer
    for _ in range(2):  # 8 unprompted steps after each outside trigger: not a runaway
        await driver.processes.advance("looping", "1")
        await driver.run_until_idle()
    assert len(Looping.triggers) == 18
    await driver.processes.advance("looping", "1")
    await driver.run_until_idle()

    events = (await store.read("looping-1")).events
    assert isinstance(events[-1].data, ProcessFailed)
    assert events[-1].data.reason.startswith("runaway: 10 steps within 10s")
    assert len(Looping.triggers) == 18 + 1 + 10  # the 11th unprompted step did not decide
    assert await redis.zcard(store.keyspace.timeouts(0)) == 0
    metrics = generate_latest(observer.registry).decode()
    assert 'rsaga_processes_runaway_total{process_type="looping"} 1.0' in metrics


# --- bug 10: events of issued commands are declared on the command ------------------------


class Announced(msgspec.Struct, frozen=True, tag="correctness.Announced"):
    """Written by `Announce` to a stream no handler reads."""

    what: str


class Announce(StatelessCommand, frozen=True, tag="correctness.Announce"):
    """Write an `Announced`, declaring it."""

    stream: StreamId
    emits = (Announced,)

    def handle(self, state: None) -> Writes:
        return {self.stream: [Announced("hello")]}


class AnnounceUndeclared(StatelessCommand, frozen=True, tag="correctness.AnnounceUndeclared"):
    """Write an `Announced` without declaring it."""

    stream: StreamId

    def handle(self, state: None) -> Writes:
        return {self.stream: [Announced("hello")]}


@pytest.mark.parametrize("declared", [True, False])
async def test_a_process_can_issue_a_command_whose_events_no_handler_reads(
    redis: Redis, prefix: str, declared: bool
) -> None:
    command = Announce if declared else AnnounceUndeclared

    class Announcer(Scripted):
        name = "announcer"
        commands = (command,)

    Announcer.decisions = [Decision(commands=[command(stream=StreamId("news-1"))])]
    Announcer.triggers = []
    store = make_store(redis, prefix)
    driver = Driver(store, [Announcer()])
    await store.append("poke-1", [Poke("1")])
    await driver.run_until_idle()
    if declared:
        [event] = (await store.read("news-1")).events
        assert event.data == Announced("hello")
        assert await letters_of(store) == []
        return
    assert await redis.xlen(store.keyspace.stream("news-1")) == 0
    [letter] = await letters_of(store)
    assert letter.error_type == "UnknownEventType"
    assert "process announcer issued AnnounceUndeclared" in letter.error
    assert "AnnounceUndeclared.emits" in letter.error
    assert "Announcer.decodes" in letter.error
