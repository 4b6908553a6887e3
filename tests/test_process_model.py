"""Model-based test of processes and sagas (issue 10): hypothesis drives random definitions,
external events, replies, delays, broken deployments, dead-letter replays and worker restarts
through the `Driver` and a `ManualClock`, and checks after every step that:

- every process is completed, compensated, failed, or active with a pending timeout (in the
  scheduler, or in dead letters after a broken deployment: visibly stuck, never silently);
- every stream reads back; no timeout is pending for a finished process;
- every command a step issued took effect once;
- a saga compensated the steps it had done in reverse order, and ended as the model predicts.

A bounded run is part of the default suite; `-m slow` runs many more examples.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import msgspec
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from rsaga import EventRegistry, EventStore, Keyspace, RecordedEvent, StatelessCommand, StreamId
from rsaga.commands import Writes
from rsaga.deadletters import DeadLetters
from rsaga.errors import DomainError
from rsaga.handlers import EventHandler, HandlerContext
from rsaga.processes import (
    CommandsIssued,
    Decision,
    EventTrigger,
    ProcessCompensated,
    ProcessCompleted,
    ProcessFailed,
    ProcessInfo,
    ProcessManager,
    Timeout,
    TimeoutCancelled,
    TimeoutFired,
    TimeoutScheduled,
    TimeoutTrigger,
    Trigger,
)
from rsaga.retry import FixedDelay
from rsaga.sagas import Saga, StepCompensated, StepFailed, StepSucceeded
from rsaga.sagas import Step as SagaStep
from rsaga.testing import Driver, ManualClock, fake_redis

# --- the world: requests, replies, services ------------------------------------------


class Begin(msgspec.Struct, frozen=True, tag="model.Begin"):
    """Starts saga `saga` (stream ``begin-<saga>``); `outcomes[step]` scripts each step."""

    saga: str
    outcomes: dict[str, str]


class Requested(msgspec.Struct, frozen=True, tag="model.Requested"):
    """A step's action (sync: done; async: a request the service answers per `outcome`)."""

    saga: str
    step: str
    outcome: str


class Done(msgspec.Struct, frozen=True, tag="model.Done"):
    """A service's success reply."""

    saga: str
    step: str


class Refused(msgspec.Struct, frozen=True, tag="model.Refused"):
    """A service's failure reply."""

    saga: str
    step: str
    reason: str = "refused"


class Undone(msgspec.Struct, frozen=True, tag="model.Undone"):
    """A compensation took effect."""

    saga: str
    step: str


class Reply(msgspec.Struct, frozen=True, tag="model.Reply"):
    """The answer a `Waiter` process waits for (stream ``reply-<id>``)."""

    waiter: str


class Asked(msgspec.Struct, frozen=True, tag="model.Asked"):
    """A `Waiter` asked (again) for its reply."""

    waiter: str
    attempt: int


WORLD = (Begin, Requested, Done, Refused, Undone, Reply, Asked)

COMPENSATION_FAILURES: dict[tuple[str, str], int] = {}
"""(saga, step) -> compensation attempts still to refuse (the model's scripted failures)."""
BROKEN = {"waiter": False}
"""A broken deployment of `Waiter`: its timeouts raise a DomainError in decide."""


class Act(StatelessCommand, frozen=True, tag="model.Act"):
    """A step's action: write `Requested`; a sync step refuses or crashes per `outcome`."""

    stream: StreamId
    saga: str
    step: str
    outcome: str
    emits = (Requested,)

    def handle(self, state: None) -> Writes:
        if self.outcome == "refuse":
            raise DomainError(f"{self.step} refused")
        if self.outcome == "crash":
            raise RuntimeError(f"{self.step} crashed")
        return {self.stream: [Requested(self.saga, self.step, self.outcome)]}


class Undo(StatelessCommand, frozen=True, tag="model.Undo"):
    """A step's compensation: refused while the model scripts failures, then `Undone`."""

    stream: StreamId
    saga: str
    step: str
    emits = (Undone,)

    def handle(self, state: None) -> Writes:
        left = COMPENSATION_FAILURES.get((self.saga, self.step), 0)
        if left:
            COMPENSATION_FAILURES[(self.saga, self.step)] = left - 1
            raise DomainError(f"undo {self.step} refused")
        return {self.stream: [Undone(self.saga, self.step)]}


class Ask(StatelessCommand, frozen=True, tag="model.Ask"):
    """A `Waiter` asks for its reply."""

    stream: StreamId
    waiter: str
    attempt: int
    emits = (Asked,)

    def handle(self, state: None) -> Writes:
        return {self.stream: [Asked(self.waiter, self.attempt)]}


class Service(EventHandler):
    """Answers async requests as scripted: "ok" Done, "fail" Refused, else (a sync step's
    record, "silent") nothing."""

    name = "model-service"
    events = (Requested,)

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        request = event.data
        reply = {"ok": Done, "fail": Refused}.get(request.outcome)
        if reply is not None:
            await ctx.execute(Answer(stream=StreamId(event.stream_id), reply=reply(
                request.saga, request.step)))


class Answer(StatelessCommand, frozen=True, tag="model.Answer"):
    """Write a service's reply."""

    stream: StreamId
    reply: Done | Refused

    def handle(self, state: None) -> Writes:
        return {self.stream: [self.reply]}


# --- the definitions under test -------------------------------------------------------


STEP_TIMEOUT = 30.0
COMPENSATION_RETRY = FixedDelay(interval=1.0, max_retries=2)


def _act(name: str) -> Any:
    def act(data: Any, saga: str) -> Act:
        outcome = data.outcomes.get(name, "ok") if isinstance(data, Begin) else "ok"
        return Act(stream=StreamId(f"svc-{saga}-{name}"), saga=saga, step=name, outcome=outcome)

    return act


def _undo(name: str) -> Any:
    def undo(data: Any, saga: str) -> Undo:
        return Undo(stream=StreamId(f"svc-{saga}-{name}"), saga=saga, step=name)

    return undo


def saga_type(kinds: list[str]) -> type[Saga]:
    """A saga whose steps s0, s1... are "sync" (the command is the step) or "async"."""

    class ModelSaga(Saga):
        name = "model-saga"
        steps = tuple(
            SagaStep(
                name=f"s{n}", action=_act(f"s{n}"), compensation=_undo(f"s{n}"),
                done=(Done,) if kind == "async" else (),
                failed=(Refused,) if kind == "async" else (),
                timeout=STEP_TIMEOUT,
            )
            for n, kind in enumerate(kinds)
        )
        starts_with = (Begin,)
        commands = (Act, Undo)
        handler_retry = FixedDelay(interval=0.001, max_retries=1)
        compensation_retry = COMPENSATION_RETRY

        def correlate(self, event: RecordedEvent) -> str | None:
            saga: str = event.data.saga
            return saga

        def fold(self, data: Any, event: RecordedEvent) -> Any:
            return event.data if isinstance(event.data, Begin) else data

        def reply_step(self, event: RecordedEvent) -> str | None:
            step: str = event.data.step
            return step

    ModelSaga.validate()
    return ModelSaga


class Waiter(ProcessManager[int]):
    """Asks for a reply, waits `wait` seconds, asks again (per `retry`), then fails."""

    name = "waiter"
    events = (Reply,)
    commands = (Ask,)
    retry = FixedDelay(interval=2.0, max_retries=2)
    wait: ClassVar[float] = 5.0

    def correlate(self, event: RecordedEvent) -> str | None:
        waiter: str = event.data.waiter
        return waiter

    def initial_state(self) -> int:
        return 0

    def decide(self, state: int, trigger: Trigger, process: ProcessInfo) -> Decision:
        ask = Ask(stream=StreamId(f"ask-{process.process_id}"), waiter=process.process_id,
                  attempt=len(process.retries) + 1)
        if process.status == "new":
            return Decision(commands=[ask], schedule=[Timeout("wait", self.wait)])
        match trigger:
            case EventTrigger():
                return Decision(complete=True)
            case TimeoutTrigger(name="wait"):
                if BROKEN["waiter"]:
                    raise DomainError("broken deployment")
                return Decision(retry="ask")
            case TimeoutTrigger(name="ask"):
                return Decision(commands=[ask], schedule=[Timeout("wait", self.wait)])
        return Decision()


# --- the model ------------------------------------------------------------------------


class SagaRun(msgspec.Struct):
    """What the model knows of one saga it started."""

    saga_id: str
    outcomes: dict[str, str]
    undo_failures: dict[str, int]


def predicted_end(kinds: list[str], run: SagaRun) -> str:
    """How a saga must end: completed, or compensated unless a compensation runs out."""
    done: list[str] = []
    for n, kind in enumerate(kinds):
        name, outcome = f"s{n}", run.outcomes.get(f"s{n}", "ok")
        if outcome in ("ok", "sync-ok"):
            done.append(name)
            continue
        undo = [*done, name] if kind == "async" and outcome == "silent" else done
        allowed = COMPENSATION_RETRY.max_retries
        if any(run.undo_failures.get(s, 0) > allowed for s in undo):
            return "failed"
        return "compensated"
    return "completed"


OUTCOMES = {"sync": ["sync-ok", "refuse", "crash"], "async": ["ok", "fail", "silent"]}
END_STATES = {ProcessCompleted: "completed", ProcessCompensated: "compensated",
              ProcessFailed: "failed"}


class ProcessModel(RuleBasedStateMachine):
    """Random definitions and traffic through a `Driver`; invariants after every step."""

    redis_url: ClassVar[str | None] = None
    """A real Redis to run on; None: a fresh fakeredis per example."""

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.prefix = "m" + uuid.uuid4().hex[:10]
        self.clock = ManualClock()
        self.sagas: list[SagaRun] = []
        self.waiters: dict[str, bool | None] = {}
        """waiter id -> None (no reply), or whether it was active when its reply came."""
        self.kinds: list[str] = []
        self.driver: Driver | None = None
        self._read: dict[str, list[RecordedEvent]] | None = None
        COMPENSATION_FAILURES.clear()
        BROKEN["waiter"] = False

    # --- setup and plumbing ---------------------------------------------------------

    def _call(self, fn: Any, *args: Any) -> Any:
        return self.portal.call(fn, *args)

    def _new_driver(self) -> Driver:
        async def make() -> Driver:
            if self.driver is not None:
                redis = self.driver.store.redis
            elif self.redis_url is not None:
                redis = Redis.from_url(self.redis_url)
            else:
                redis = fake_redis()
            store = EventStore(redis, EventRegistry(WORLD), keyspace=Keyspace(prefix=self.prefix))
            definitions = [saga_type(self.kinds)(), Waiter(), Service()]
            return Driver(store, definitions, clock=self.clock)

        driver: Driver = self._call(make)
        return driver

    @property
    def store(self) -> EventStore:
        assert self.driver is not None
        return self.driver.store

    def _run_until_idle(self) -> None:
        assert self.driver is not None
        self._read = None
        self._call(self.driver.run_until_idle)

    def _advance(self, seconds: float) -> None:
        assert self.driver is not None
        self._read = None
        self._call(self.driver.advance, seconds)

    @initialize(kinds=st.lists(st.sampled_from(["sync", "async"]), min_size=1, max_size=3))
    def define(self, kinds: list[str]) -> None:
        self.kinds = kinds
        self.driver = self._new_driver()

    def teardown(self) -> None:
        try:
            if self.driver is not None:
                self._final_check()
        finally:
            if self.driver is not None:
                self._call(self.driver.store.redis.aclose)
            self._portal_cm.__exit__(None, None, None)

    # --- rules ------------------------------------------------------------------------

    @rule(data=st.data())
    def start_saga(self, data: st.DataObject) -> None:
        saga_id = f"g{len(self.sagas)}"
        outcomes = {
            f"s{n}": data.draw(st.sampled_from(OUTCOMES[kind]), label=f"s{n}")
            for n, kind in enumerate(self.kinds)
        }
        failures = {f"s{n}": data.draw(st.sampled_from([0, 0, 1, 3]), label=f"undo s{n}")
                    for n in range(len(self.kinds))}
        for step, count in failures.items():
            COMPENSATION_FAILURES[(saga_id, step)] = count
        self.sagas.append(SagaRun(saga_id, outcomes, failures))
        self._call(self.store.append, f"begin-{saga_id}", [Begin(saga_id, outcomes)])
        self._run_until_idle()

    @rule()
    def start_waiter(self) -> None:
        waiter = f"w{len(self.waiters)}"
        self.waiters[waiter] = None
        assert self.driver is not None
        self._call(self.driver.processes.start, "waiter", waiter)
        self._run_until_idle()

    @precondition(lambda self: any(v is None for v in self.waiters.values()))
    @rule(data=st.data())
    def reply_to_waiter(self, data: st.DataObject) -> None:
        waiting = [w for w, replied in self.waiters.items() if replied is None]
        waiter = data.draw(st.sampled_from(waiting))
        self.waiters[waiter] = self._status(f"waiter-{waiter}") == "active"
        self._call(self.store.append, f"reply-{waiter}", [Reply(waiter)])
        self._run_until_idle()

    @precondition(lambda self: bool(self.sagas))
    @rule(data=st.data())
    def stray_reply(self, data: st.DataObject) -> None:
        """A late or duplicate reply for some step of some saga: never double-counted."""
        run = data.draw(st.sampled_from(self.sagas))
        step = f"s{data.draw(st.integers(0, len(self.kinds) - 1))}"
        if run.outcomes[step] == "silent" and self._status(f"model-saga-{run.saga_id}") == "active":
            return  # that would be the awaited reply itself, not a stray one
        reply = data.draw(st.sampled_from([Done, Refused]))
        self._call(self.store.append, f"svc-{run.saga_id}-{step}", [reply(run.saga_id, step)])
        self._run_until_idle()

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 5.0, 30.0, 120.0]))
    def advance(self, seconds: float) -> None:
        self._advance(seconds)

    @rule()
    def restart_worker(self) -> None:
        self.driver = self._new_driver()
        self._run_until_idle()

    @rule(broken=st.booleans())
    def deploy(self, broken: bool) -> None:
        """A deployment of `Waiter`: a broken one dead-letters its timeouts."""
        BROKEN["waiter"] = broken

    @precondition(lambda self: not BROKEN["waiter"])
    @rule()
    def replay_dead_letters(self) -> None:
        letters = DeadLetters(self.store.redis, self.store.keyspace)
        escalations = {d.id for d in self._call(letters.list) if d.error_type == "ProcessFailed"}
        report = self._call(letters.replay_all)
        assert set(report.failed) == escalations  # reports of failed sagas: nothing to replay
        self._run_until_idle()

    # --- invariants --------------------------------------------------------------------

    def _status(self, stream_id: str) -> str:
        events = self._call(self.store.read, stream_id).events
        for event in reversed(events):
            for kind, state in END_STATES.items():
                if isinstance(event.data, kind):
                    return state
        return "active" if events else "new"

    def _streams(self) -> dict[str, list[RecordedEvent]]:
        if self._read is not None:
            return self._read

        async def read_all() -> dict[str, list[RecordedEvent]]:
            ks = self.store.keyspace
            prefix = ks.stream("x")[: -len("x")]
            keys = [k.decode() async for k in self.store.redis.scan_iter(match=f"{prefix}*")]
            ids = [k[len(prefix):] for k in keys]
            read = await self.store.read_streams(ids)  # raises if anything cannot be decoded
            return {s: read[s].events for s in ids}

        self._read = self._call(read_all)
        return self._read

    @invariant()
    def every_process_ends_or_visibly_waits(self) -> None:
        if self.driver is None:
            return
        streams = self._streams()
        ks = self.store.keyspace
        redis = self.store.redis
        scheduled = {m.decode() for m in self._call(redis.zrange, ks.timeouts(0), 0, -1)}
        letters = self._call(DeadLetters(redis, ks).list)
        lettered = {(d.stream_id, d.timeout) for d in letters if d.timeout}
        # Only timeouts of a broken deployment, and reports of sagas whose compensation failed.
        assert all(d.timeout or d.error_type == "ProcessFailed" for d in letters), letters
        processes = {s: e for s, e in streams.items() if s.startswith(("model-saga-", "waiter-"))}
        for stream_id, events in processes.items():
            pending: dict[str, str] = {}
            end = None
            for event in events:
                match event.data:
                    case TimeoutScheduled(name=name, token=token):
                        pending[name] = token
                    case TimeoutCancelled(name=name, token=token) | TimeoutFired(
                        name=name, token=token
                    ) if pending.get(name) == token:
                        del pending[name]
                    case ProcessCompleted() | ProcessCompensated() | ProcessFailed():
                        assert end is None, f"{stream_id} ended twice"
                        end = event.data
            mine = {t for t in scheduled if t.startswith(f"{stream_id}|")}
            if end is not None:
                assert not pending, f"{stream_id} finished with timeouts pending: {pending}"
                assert not mine, f"{stream_id} finished with timeouts scheduled: {mine}"
                continue
            assert pending, f"{stream_id} is active without a pending timeout: stuck"
            for name in pending:
                assert f"{stream_id}|{name}" in mine or (stream_id, name) in lettered, (
                    f"{stream_id} waits on {name}, which is neither scheduled nor dead-lettered"
                )

    @invariant()
    def every_command_took_effect_once(self) -> None:
        if self.driver is None:
            return
        streams = self._streams()
        effects: dict[str, int] = {}
        issued: set[str] = set()
        for stream_id, events in streams.items():
            for event in events:
                if isinstance(event.data, CommandsIssued):
                    assert event.command_id is not None
                    issued.update(
                        f"{event.command_id}:command:{n}" for n in range(len(event.data.commands))
                    )
                elif event.command_id and ":command:" in event.command_id and not (
                    stream_id.startswith(("model-saga-", "waiter-"))
                ):
                    effects[event.command_id] = effects.get(event.command_id, 0) + 1
        assert all(count == 1 for count in effects.values()), effects
        assert set(effects) <= issued

    @invariant()
    def sagas_compensate_in_reverse_and_end_as_predicted(self) -> None:
        if self.driver is None:
            return
        streams = self._streams()
        for run in self.sagas:
            events = streams.get(f"model-saga-{run.saga_id}", [])
            succeeded = [e.data.step for e in events if isinstance(e.data, StepSucceeded)]
            compensated = [e.data.step for e in events if isinstance(e.data, StepCompensated)]
            failed = [e.data for e in events if isinstance(e.data, StepFailed)]
            assert len(failed) <= 1
            owed = [*succeeded, failed[0].step] if failed and failed[0].timed_out else succeeded
            assert compensated == list(reversed(owed))[: len(compensated)]
            end = self._status(f"model-saga-{run.saga_id}")
            if end != "active":
                assert end == predicted_end(self.kinds, run), (run, self.kinds, end)
                if end == "compensated":
                    assert compensated == list(reversed(owed))

    # --- the end -----------------------------------------------------------------------

    def _final_check(self) -> None:
        """Fix the deployment, replay, let time pass: every process has ended as it should."""
        BROKEN["waiter"] = False
        self.replay_dead_letters()
        assert self.driver is not None
        for _ in range(8):  # each advance fires one generation of timeouts
            self._advance(1000.0)
        for run in self.sagas:
            assert self._status(f"model-saga-{run.saga_id}") == predicted_end(self.kinds, run)
        for waiter, active_at_reply in self.waiters.items():
            end = self._status(f"waiter-{waiter}")
            assert end == ("completed" if active_at_reply else "failed"), (waiter, end)
        self.every_process_ends_or_visibly_waits()


def test_process_model_on_real_redis(real_redis_url: str) -> None:
    class Model(ProcessModel):
        redis_url = real_redis_url

    run_state_machine_as_test(
        Model,
        settings=settings(
            max_examples=4, stateful_step_count=8, deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


ProcessModel.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestProcessModel = ProcessModel.TestCase


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fakeredis", "redis"])
def test_process_model_many_examples(backend: str, request: pytest.FixtureRequest) -> None:
    """About four minutes per backend: only when asked for with ``-m slow``."""
    if "slow" not in (request.config.option.markexpr or "").replace("not slow", ""):
        pytest.skip("many examples: run with -m slow")
    class Model(ProcessModel):
        redis_url = request.getfixturevalue("real_redis_url") if backend == "redis" else None

    run_state_machine_as_test(
        Model,
        settings=settings(
            max_examples=100,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )

