"""Sagas: the travel booking example driven in-process, on both backends."""

from __future__ import annotations

import random

import msgspec
import pytest
from conftest import shards_for
from redis.asyncio import Redis
from rsaga_examples.travel import (
    SERVICES,
    TRAVEL_EVENTS,
    Booked,
    CancellationRequested,
    Cancelled,
    CarService,
    FlightService,
    HotelService,
    TravelBooking,
    TripRequested,
)

from rsaga import EventRegistry, EventStore, Keyspace, RecordedEvent
from rsaga.deadletters import DeadLetters
from rsaga.processes import (
    CommandRegistry,
    IncompatibleDefinition,
    IssuedCommand,
    ProcessCompensated,
    ProcessCompleted,
    ProcessFailed,
    TimeoutScheduled,
    UnknownCommandType,
)
from rsaga.sagas import (
    CompensationAttemptFailed,
    CompensationStarted,
    SagaCompensated,
    SagaCompensationFailed,
    SagaCompleted,
    StepCompensated,
    StepFailed,
    StepStarted,
    StepSucceeded,
)
from rsaga.testing import Driver

SERVICE_HANDLERS = [HotelService(), FlightService(), CarService()]


def make_store(redis: Redis, prefix: str, shards: int | None = None) -> EventStore:
    """A store on `redis`; on a cluster with 8 shards unless `shards` is given (tests that
    look at one shard's keys use one shard)."""
    keyspace = Keyspace(prefix=prefix, shards=shards or shards_for(redis))
    return EventStore(redis, EventRegistry(TRAVEL_EVENTS), keyspace=keyspace)


async def saga_history(store: EventStore, trip_id: str) -> list[RecordedEvent]:
    return (await store.read(f"travel-booking-{trip_id}")).events


STEP_EVENTS = (
    StepStarted, StepSucceeded, StepFailed, StepCompensated, CompensationStarted,
    CompensationAttemptFailed,
)
END_EVENTS = (SagaCompleted, SagaCompensated, SagaCompensationFailed)


def steps_of(events: list[RecordedEvent]) -> list[tuple[str, str]]:
    """The saga's step events as (kind, step), in order."""
    out = []
    for event in events:
        data = event.data
        if isinstance(data, STEP_EVENTS):
            out.append((type(data).__name__, data.step))
        elif isinstance(data, END_EVENTS):
            out.append((type(data).__name__, ""))
    return out


async def run_trip(redis: Redis, prefix: str, trip: TripRequested) -> tuple[EventStore, Driver]:
    store = make_store(redis, prefix)
    driver = Driver(store, [TravelBooking(), *SERVICE_HANDLERS])
    await store.append(f"trip-{trip.trip_id}", [trip])
    await driver.run_until_idle()
    return store, driver


async def service_events(store: EventStore, trip_id: str) -> dict[str, list[str]]:
    return {
        s: [type(e.data).__name__ for e in (await store.read(f"{s}-{trip_id}")).events]
        for s in SERVICES
    }


async def test_all_steps_succeed(redis: Redis, prefix: str) -> None:
    store, _ = await run_trip(redis, prefix, TripRequested("t1"))
    events = await saga_history(store, "t1")
    assert steps_of(events) == [
        ("StepStarted", "hotel"), ("StepSucceeded", "hotel"),
        ("StepStarted", "flight"), ("StepSucceeded", "flight"),
        ("StepStarted", "car"), ("StepSucceeded", "car"),
        ("SagaCompleted", ""),
    ]
    assert isinstance(events[-1].data, ProcessCompleted)
    assert await redis.zcard(store.keyspace.timeouts(0)) == 0


async def test_flight_fails_so_the_hotel_is_cancelled_and_no_car_booked(
    redis: Redis, prefix: str
) -> None:
    store, _ = await run_trip(redis, prefix, TripRequested("t2", fail_at="flight"))
    events = await saga_history(store, "t2")
    assert steps_of(events) == [
        ("StepStarted", "hotel"), ("StepSucceeded", "hotel"),
        ("StepStarted", "flight"), ("StepFailed", "flight"),
        ("CompensationStarted", "hotel"), ("StepCompensated", "hotel"),
        ("SagaCompensated", ""),
    ]
    assert events[-1].data == ProcessCompensated("flight failed: sold out", 0)
    assert await service_events(store, "t2") == {
        "hotel": ["BookingRequested", "Booked", "CancellationRequested", "Cancelled"],
        "flight": ["BookingRequested", "BookingFailed"],
        "car": [],
    }


async def test_a_failure_at_the_last_step_compensates_every_step_in_reverse(
    redis: Redis, prefix: str
) -> None:
    store, _ = await run_trip(redis, prefix, TripRequested("t3", fail_at="car"))
    compensations = [
        s for kind, s in steps_of(await saga_history(store, "t3")) if kind == "StepCompensated"
    ]
    assert compensations == ["flight", "hotel"]
    booked = await service_events(store, "t3")
    assert booked["hotel"][-1] == booked["flight"][-1] == "Cancelled"
    assert booked["car"] == ["BookingRequested", "BookingFailed"]


async def test_a_compensation_failing_twice_is_retried_with_backoff(
    redis: Redis, prefix: str
) -> None:
    store, driver = await run_trip(
        redis, prefix, TripRequested("t4", fail_at="flight", cancel_failures=2)
    )
    for attempt in (1, 2):  # each failed attempt waits the policy's delay before the next
        delay = TravelBooking.compensation_retry.delay(attempt)
        assert delay is not None
        await driver.advance(delay)
    events = await saga_history(store, "t4")
    assert [k for k, _ in steps_of(events)][-7:] == [
        "CompensationStarted", "CompensationAttemptFailed",
        "CompensationStarted", "CompensationAttemptFailed",
        "CompensationStarted", "StepCompensated", "SagaCompensated",
    ]
    assert isinstance(events[-1].data, ProcessCompensated)
    retries = [
        e for e in events
        if isinstance(e.data, TimeoutScheduled) and e.data.name.startswith("retry-")
    ]
    delays = [e.data.due_ms - int(e.occurred_at.timestamp() * 1000) for e in retries]
    assert delays == [1000, 2000]  # ExponentialBackoff(base=1.0): 1 s, then 2 s
    hotel = (await service_events(store, "t4"))["hotel"]
    assert hotel.count("CancellationRequested") == 3
    assert hotel[-1] == "Cancelled"


async def test_a_compensation_that_always_fails_ends_in_compensation_failed(
    redis: Redis, prefix: str
) -> None:
    store, driver = await run_trip(
        redis, prefix, TripRequested("t5", fail_at="car", cancel_failures=99)
    )
    for _ in range(TravelBooking.compensation_retry.max_retries + 1):
        await driver.advance(60)
    events = await saga_history(store, "t5")
    final = [e.data for e in events if isinstance(e.data, SagaCompensationFailed)]
    assert [f.step for f in final] == ["flight"]
    assert isinstance(events[-1].data, ProcessFailed)
    attempts = [e for e in events if isinstance(e.data, CompensationStarted)]
    assert len(attempts) == TravelBooking.compensation_retry.max_retries + 1
    [letter] = await DeadLetters(redis, store.keyspace).list()
    assert letter.handler == "travel-booking"
    assert letter.stream_id == "travel-booking-t5"
    assert "compensation of flight failed 5 times: system busy" in letter.error
    shard = store.keyspace.shard_of("travel-booking-t5")
    stats = await redis.hgetall(store.keyspace.process_stats(shard, "travel-booking"))
    assert stats[b"failed"] == b"1"


async def test_a_step_whose_service_never_replies_times_out_and_compensates(
    redis: Redis, prefix: str
) -> None:
    store, driver = await run_trip(redis, prefix, TripRequested("t6", silent="flight"))
    await driver.advance(TravelBooking.steps[1].timeout)
    events = await saga_history(store, "t6")
    assert steps_of(events)[3:] == [
        ("StepFailed", "flight"),
        ("CompensationStarted", "flight"),  # it may have been booked: cancel it too
        ("StepCompensated", "flight"),
        ("CompensationStarted", "hotel"),
        ("StepCompensated", "hotel"),
        ("SagaCompensated", ""),
    ]
    failed = next(e.data for e in events if isinstance(e.data, StepFailed))
    assert failed.timed_out
    assert failed.reason == f"no reply within {TravelBooking.steps[1].timeout:g}s"
    assert (await service_events(store, "t6"))["car"] == []


@pytest.mark.slow
async def test_1000_concurrent_sagas_with_30_percent_failures_leave_no_orphan(
    real_redis_url: str, prefix: str
) -> None:
    redis = Redis.from_url(real_redis_url)
    store = make_store(redis, prefix)
    driver = Driver(store, [TravelBooking(), *SERVICE_HANDLERS])
    rng = random.Random(30)
    trips = [
        TripRequested(f"c{n}", fail_at=rng.choice(SERVICES) if rng.random() < 0.3 else None)
        for n in range(1000)
    ]
    for trip in trips:
        await store.append(f"trip-{trip.trip_id}", [trip])
    await driver.run_until_idle()
    outcomes = {"SagaCompleted": 0, "SagaCompensated": 0}
    ends = await store.read_streams([f"travel-booking-{t.trip_id}" for t in trips])
    for trip in trips:
        events = ends[f"travel-booking-{trip.trip_id}"].events
        final = next(
            type(e.data).__name__ for e in reversed(events)
            if isinstance(e.data, SagaCompleted | SagaCompensated)
        )
        assert final == ("SagaCompensated" if trip.fail_at else "SagaCompleted")
        outcomes[final] += 1
    assert sum(outcomes.values()) == 1000
    services = await store.read_streams(
        [f"{s}-{t.trip_id}" for t in trips for s in SERVICES]
    )
    for trip in trips:
        for service in SERVICES:
            events = services[f"{service}-{trip.trip_id}"].events
            booked = sum(isinstance(e.data, Booked) for e in events)
            cancelled = sum(isinstance(e.data, Cancelled) for e in events)
            assert booked <= 1
            if booked and trip.fail_at:  # an orphan: booked, trip not completed, not cancelled
                assert cancelled == 1, f"orphan booking {service} of {trip.trip_id}"
            if not trip.fail_at:
                assert cancelled == 0
    await redis.aclose()


def test_an_unknown_command_name_is_a_clear_error() -> None:
    registry = CommandRegistry()
    with pytest.raises(UnknownCommandType, match=r"'travel\.Teleport' is not registered"):
        registry.decode(IssuedCommand("travel.Teleport", msgspec.Raw(b"\x80")))


async def test_a_definition_that_gains_a_field_keeps_running_processes_going(
    redis: Redis, prefix: str
) -> None:
    """An old process (events without the new field) continues under the new definition."""

    class OldRequest(msgspec.Struct, frozen=True, tag="travel.CancellationRequested"):
        trip_id: str
        service: str

    old = EventStore(redis, EventRegistry([OldRequest]), keyspace=Keyspace(prefix=prefix))
    await old.append("hotel-v1", [OldRequest("v1", "hotel")])
    new = make_store(redis, prefix, shards=1)
    [event] = (await new.read("hotel-v1")).events
    assert event.data == CancellationRequested("v1", "hotel", fail_times=0)


async def test_an_incompatible_definition_change_is_reported_clearly(
    redis: Redis, prefix: str
) -> None:
    store, driver = await run_trip(redis, prefix, TripRequested("t7", silent="hotel"))

    class TravelBookingV3(TravelBooking):
        version = 3
        compatible_since = 3

    runner = Driver(store, [TravelBookingV3(), *SERVICE_HANDLERS], clock=driver.clock)
    await runner.advance(60)  # the hotel step times out under the new definition
    [letter] = await DeadLetters(redis, store.keyspace).list()
    assert letter.error_type == IncompatibleDefinition.__name__
    assert "started by travel-booking definition version 1" in letter.error
    assert "continues versions >= 3 only" in letter.error
