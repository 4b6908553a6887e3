"""Operator actions on one process (terminate, signal, retry, state), on both backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import anyio
import msgspec
import pytest
from redis.asyncio import Redis
from rsaga_examples.orders import (
    WORLD_EVENTS,
    OrderFulfilment,
    OrderPlaced,
    PaymentService,
)
from rsaga_examples.travel import (
    TRAVEL_EVENTS,
    CarService,
    FlightService,
    HotelService,
    TravelBooking,
    TripRequested,
)

from rsaga import DomainError, EventRegistry, EventStore, Keyspace, RecordedEvent
from rsaga.cli import main
from rsaga.deadletters import DeadLetters
from rsaga.operator import Operator
from rsaga.processes import (
    AdvanceTrigger,
    Decision,
    EventTrigger,
    NothingToRetry,
    ProcessCompensated,
    ProcessCompleted,
    ProcessFailed,
    ProcessFinished,
    ProcessInfo,
    ProcessManager,
    ProcessNotFound,
    ProcessRetried,
    ProcessSignalled,
    ProcessTerminated,
    Timeout,
    TimeoutFired,
    TimeoutTrigger,
    Trigger,
)
from rsaga.sagas import StepCompensated, StepSucceeded
from rsaga.testing import Driver

BY = "alice@ops"


class Approval(msgspec.Struct, frozen=True, tag="test.ApprovalRequested"):
    """Starts an approval process (stream ``request-<id>``)."""

    request_id: str


class Reminder(msgspec.Struct, frozen=True, tag="test.Reminder"):
    """Someone asked the approval process to hurry (stream ``reminder-<id>``)."""

    request_id: str


class Approved(msgspec.Struct, frozen=True, tag="test.Approved"):
    """The approval process recorded a decision."""

    by: str


class ApprovalProcess(ProcessManager[list[str]]):
    """Waits for a signal {"approve": true}; its state is the approvers so far."""

    name = "approval"
    events = (Approval, Reminder)
    state_events = (Approved,)
    broken: ClassVar[bool] = False
    """While set, `decide` cannot handle reminders (an operator fixes it, then retries)."""

    def correlate(self, event: RecordedEvent) -> str | None:
        return str(event.data.request_id)

    def initial_state(self) -> list[str]:
        return []

    def apply(self, state: list[str], event: RecordedEvent) -> list[str]:
        return [*state, event.data.by] if isinstance(event.data, Approved) else state

    def decide(self, state: list[str], trigger: Trigger, process: ProcessInfo) -> Decision:
        match trigger:
            case EventTrigger(event=RecordedEvent(data=Approval())):
                return Decision(events=[Approved("nobody")], schedule=[Timeout("remind", 60)])
            case TimeoutTrigger(name="remind"):
                if ApprovalProcess.broken:
                    raise DomainError("reminders are broken")
                return Decision(events=[Approved("timer")])
            case EventTrigger(event=RecordedEvent(data=Reminder())):
                if ApprovalProcess.broken:
                    raise DomainError("reminders are broken")
                return Decision(events=[Approved("reminded")])
            case AdvanceTrigger(data={"approve": True, "by": str(who)}):
                return Decision(events=[Approved(who)], complete=len(state) >= 1)
        return Decision()


def make_store(redis: Redis, prefix: str) -> EventStore:
    registry = EventRegistry([*WORLD_EVENTS, *TRAVEL_EVENTS, Approval, Reminder])
    return EventStore(redis, registry, keyspace=Keyspace(prefix=prefix))


@pytest.fixture
async def driver(redis: Redis, prefix: str) -> Driver:
    services = [PaymentService(), HotelService(), FlightService(), CarService()]
    return Driver(make_store(redis, prefix),
                  [OrderFulfilment(), TravelBooking(), ApprovalProcess(), *services])


def operator(driver: Driver) -> Operator:
    return Operator(driver.processes, by=BY)


async def events_of(driver: Driver, stream_id: str) -> list[Any]:
    return [e.data for e in (await driver.store.read(stream_id)).events]


async def pending_timeouts(driver: Driver, stream_id: str) -> list[bytes]:
    members = await driver.store.redis.zrange(driver.store.keyspace.timeouts(0), 0, -1)
    return [m for m in members if m.startswith(stream_id.encode() + b"|")]


async def test_terminate_fails_the_process_cancels_its_timeouts_and_records_who(
    driver: Driver,
) -> None:
    await driver.store.append("order-1", [OrderPlaced("1", 100, payment="silent")])
    await driver.run_until_idle()
    stream = "order-fulfilment-1"
    assert await pending_timeouts(driver, stream)

    state = await operator(driver).terminate(stream, "customer called to cancel")

    assert state.info.status == "failed"
    history = await events_of(driver, stream)
    assert ProcessTerminated("customer called to cancel", BY) in history
    assert history[-1] == ProcessFailed(
        f"terminated by {BY}: customer called to cancel", history[-1].duration_ms
    )
    assert await pending_timeouts(driver, stream) == []
    await driver.advance(3600)  # nothing fires for it any more
    assert (await events_of(driver, stream)) == history


async def test_actions_on_a_finished_or_unknown_process_are_refused_and_write_nothing(
    driver: Driver,
) -> None:
    await driver.store.append("order-2", [OrderPlaced("2", 100, payment="decline")])
    await driver.run_until_idle()
    stream = "order-fulfilment-2"
    before = await events_of(driver, stream)
    assert isinstance(before[-1], ProcessFailed)
    ops = operator(driver)
    with pytest.raises(ProcessFinished, match="already ended failed: nothing to terminate"):
        await ops.terminate(stream, "again")
    with pytest.raises(ProcessFinished, match="nothing to signal"):
        await ops.signal(stream, {"x": 1})
    with pytest.raises(ProcessFinished, match="nothing to retry"):
        await ops.retry(stream)
    assert await events_of(driver, stream) == before
    with pytest.raises(ProcessNotFound, match="no process with stream 'order-2'"):
        await ops.terminate("order-2", "not a process stream")
    with pytest.raises(ProcessNotFound):
        await ops.state("order-fulfilment-404")
    with pytest.raises(ValueError, match="give a reason"):
        await ops.terminate(stream, "  ")


async def test_terminate_with_compensation_undoes_a_saga_in_reverse_and_ends_compensated(
    driver: Driver,
) -> None:
    await driver.store.append("trip-t1", [TripRequested("t1", silent="car")])
    await driver.run_until_idle()
    stream = "travel-booking-t1"
    assert [e.step for e in await events_of(driver, stream) if isinstance(e, StepSucceeded)] == [
        "hotel", "flight",
    ]
    ops = operator(driver)
    await driver.store.append("order-3", [OrderPlaced("3", 100, payment="silent")])
    await driver.run_until_idle()
    order = await events_of(driver, "order-fulfilment-3")
    with pytest.raises(ValueError, match="not a saga"):
        await ops.terminate("order-fulfilment-3", "no", compensate=True)
    assert await events_of(driver, "order-fulfilment-3") == order

    state = await ops.terminate(stream, "trip cancelled by phone", compensate=True)
    await driver.run_until_idle()

    history = await events_of(driver, stream)
    assert ProcessTerminated("trip cancelled by phone", BY, compensate=True) in history
    assert [e.step for e in history if isinstance(e, StepCompensated)] == [
        "car", "flight", "hotel",
    ]
    assert isinstance(history[-1], ProcessCompensated)
    assert state.info.status == "active"  # compensating when the call returned
    assert (await ops.state(stream)).info.status == "compensated"
    assert await pending_timeouts(driver, stream) == []


async def test_signal_reaches_decide_once_per_key(driver: Driver) -> None:
    await driver.store.append("request-r1", [Approval("r1")])
    await driver.run_until_idle()
    stream = "approval-r1"
    ops = operator(driver)

    state = await ops.signal(stream, {"approve": True, "by": "bob"}, key="ticket-17")
    again = await ops.signal(stream, {"approve": True, "by": "bob"}, key="ticket-17")

    assert state.state == ["nobody", "bob"] == again.state
    history = await events_of(driver, stream)
    assert history.count(ProcessSignalled({"approve": True, "by": "bob"}, BY)) == 1
    assert isinstance(history[-1], ProcessCompleted)


async def test_retry_fires_the_pending_timeout_now(driver: Driver) -> None:
    await driver.store.append("order-4", [OrderPlaced("4", 100, payment="silent")])
    await driver.run_until_idle()
    stream = "order-fulfilment-4"
    ops = operator(driver)
    with pytest.raises(NothingToRetry, match="no pending timeout 'nope'"):
        await ops.retry(stream, timer="nope")

    said = await ops.retry(stream)  # the payment wait, 30 s early: the process retries payment

    assert said.startswith("fired timeout payment-wait")
    history = await events_of(driver, stream)
    fired = [e for e in history if isinstance(e, TimeoutFired)]
    assert [f.name for f in fired] == ["payment-wait"]
    assert ProcessRetried("timeout payment-wait", BY) in history
    members = await pending_timeouts(driver, stream)
    assert b"order-fulfilment-4|payment-wait" not in members
    assert b"order-fulfilment-4|payment" in members  # the retry the process scheduled
    requests = len((await driver.store.read("payment-4")).events)
    await ops.retry(stream)  # the payment retry, now: payment is requested again
    await driver.run_until_idle()
    assert len((await driver.store.read("payment-4")).events) == requests + 1


async def test_retry_redelivers_a_dead_lettered_trigger_after_the_fix(driver: Driver) -> None:
    await driver.store.append("request-r2", [Approval("r2")])
    await driver.run_until_idle()
    ApprovalProcess.broken = True
    try:
        await driver.store.append("reminder-r2", [Reminder("r2")])
        await driver.run_until_idle()
    finally:
        ApprovalProcess.broken = False  # the fix is deployed
    letters = DeadLetters(driver.store.redis, driver.store.keyspace)
    [letter] = await letters.list()
    assert letter.handler == "approval"
    ops = operator(driver)

    said = await ops.retry("approval-r2")
    await driver.run_until_idle()

    assert said == f"re-delivered dead letter 0/{letter.id}"
    assert await letters.list() == []
    assert (await ops.state("approval-r2")).state == ["nobody", "reminded"]
    history = await events_of(driver, "approval-r2")
    assert ProcessRetried(f"dead letter 0/{letter.id}", BY) in history
    assert (await ops.retry("approval-r2")).startswith("fired timeout remind")
    with pytest.raises(NothingToRetry, match="no pending timeout and no dead-lettered"):
        await ops.retry("approval-r2")


async def test_retry_redelivers_a_dead_lettered_timeout(driver: Driver) -> None:
    await driver.store.append("request-r4", [Approval("r4")])
    await driver.run_until_idle()
    ApprovalProcess.broken = True
    try:
        await driver.advance(60)  # the reminder fires into a broken decide: dead-lettered
    finally:
        ApprovalProcess.broken = False
    letters = DeadLetters(driver.store.redis, driver.store.keyspace)
    [letter] = await letters.list()
    assert letter.timeout == "remind"
    ops = operator(driver)

    said = await ops.retry("approval-r4")
    await driver.run_until_idle()

    assert said == f"re-delivered dead letter 0/{letter.id}"
    assert (await ops.state("approval-r4")).state == ["nobody", "timer"]
    assert await letters.list() == []


async def test_state_is_the_definitions_fold(driver: Driver) -> None:
    await driver.store.append("order-5", [OrderPlaced("5", 250, payment="silent")])
    await driver.run_until_idle()
    state = await operator(driver).state("order-fulfilment-5")
    assert state.info.status == "active"
    assert state.info.process_type == "order-fulfilment"
    assert sorted(state.info.pending) == ["payment-wait", "rsaga.deadline"]
    assert state.state.status == "PaymentPending"
    assert state.state.amount == 250
    assert msgspec.json.decode(msgspec.json.encode(state))["state"]["amount"] == 250


async def _waiting_order(url: str, prefix: str, order_id: str) -> None:
    redis = Redis.from_url(url)
    try:
        driver = Driver(make_store(redis, prefix), [OrderFulfilment()])
        await driver.store.append(f"order-{order_id}", [OrderPlaced(order_id, 100)])
        await driver.run_until_idle()
    finally:
        await redis.aclose()


def test_the_cli_verbs_act_on_one_process(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
    prefix: str,
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    anyio.run(_waiting_order, real_redis_url, prefix, "c1")
    stream = "order-fulfilment-c1"

    assert main(["process", "state", stream]) == 0
    out = capsys.readouterr().out
    assert f"process {stream} (order-fulfilment): active" in out
    assert "waiting for timeout payment-wait" in out
    assert '"status":"PaymentPending"' in out
    assert main(["process", "state", stream, "--json"]) == 0
    assert msgspec.json.decode(capsys.readouterr().out)["info"]["status"] == "active"

    assert main(["process", "signal", stream, "--data", "{not json"]) == 2
    assert "--data is not JSON" in capsys.readouterr().err
    assert main(["process", "signal", stream, "--data", '{"note": 1}', "--key", "k1"]) == 0
    assert f"signalled {stream}: now active" in capsys.readouterr().out
    assert main(["process", "retry", stream, "--timeout", "payment-wait"]) == 0
    assert "fired timeout payment-wait" in capsys.readouterr().out
    assert main(["process", "terminate", stream, "--reason", "test over"]) == 0
    assert "now failed" in capsys.readouterr().out
    assert main(["process", "terminate", stream, "--reason", "again"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "already ended failed" in err
    assert main(["process", "retry", "order-fulfilment-nope"]) == 1
    assert "no process with stream" in capsys.readouterr().err
