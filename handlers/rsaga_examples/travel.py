"""Travel booking: a saga of hotel, flight and car, with cancellations as compensations.

A `TripRequested` event (stream ``trip-<id>``) starts the saga. Each step sends
a `BookingRequested` to a service stream (``hotel-<id>``, ``flight-<id>``,
``car-<id>``) and waits for `Booked` or `BookingFailed`. When a step fails,
the saga cancels what was booked, newest first, retrying cancellations that
fail.

The services are simulated by handlers. What they do is decided by the trip
itself, so tests and the demo are deterministic: `fail_at` names the service
that refuses, `silent` one that never answers, and `cancel_failures` how many
cancellation attempts fail before one succeeds. ``RSAGA_SERVICE_LATENCY_MS``
adds latency to every reply.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import anyio
import msgspec

from rsaga import Command, RecordedEvent, StatelessCommand, StreamId, Writes
from rsaga.handlers import EventHandler, HandlerContext
from rsaga.retry import ExponentialBackoff, RetryPolicy
from rsaga.sagas import Saga, Step

SERVICES = ("hotel", "flight", "car")
STEP_TIMEOUT = 10.0
"""Seconds each booking step waits for its service's reply (example-sized)."""


class TripRequested(msgspec.Struct, frozen=True, tag="travel.TripRequested"):
    """A traveller asked for a trip: hotel, flight and car."""

    trip_id: str
    hotel: str = "Grand Hotel"
    flight: str = "LH 400"
    car: str = "compact"
    fail_at: str | None = None
    silent: str | None = None
    cancel_failures: int = 0


class BookingRequested(msgspec.Struct, frozen=True, tag="travel.BookingRequested"):
    """The saga asks a service to book `item`."""

    trip_id: str
    service: str
    item: str
    fail: bool = False
    silent: bool = False


class Booked(msgspec.Struct, frozen=True, tag="travel.Booked"):
    """The service booked it."""

    trip_id: str
    service: str
    ref: str


class BookingFailed(msgspec.Struct, frozen=True, tag="travel.BookingFailed"):
    """The service could not book it."""

    trip_id: str
    service: str
    reason: str


class CancellationRequested(msgspec.Struct, frozen=True, tag="travel.CancellationRequested"):
    """The saga asks a service to cancel the trip's booking (if there is one)."""

    trip_id: str
    service: str
    fail_times: int = 0


class Cancelled(msgspec.Struct, frozen=True, tag="travel.Cancelled"):
    """The booking is cancelled (or there was none)."""

    trip_id: str
    service: str


class CancellationFailed(msgspec.Struct, frozen=True, tag="travel.CancellationFailed"):
    """The cancellation did not go through this time."""

    trip_id: str
    service: str
    reason: str


TRAVEL_EVENTS = (
    TripRequested, BookingRequested, Booked, BookingFailed, CancellationRequested, Cancelled,
    CancellationFailed,
)


class _Append(StatelessCommand, frozen=True):
    """Append one event to one stream."""

    stream: StreamId


    def event(self) -> msgspec.Struct:
        raise NotImplementedError

    def handle(self, state: None) -> Writes:
        return {self.stream: [self.event()]}


class RequestBooking(_Append, frozen=True, tag="travel.RequestBooking"):
    """Send a booking request to a service."""

    request: BookingRequested
    emits = (BookingRequested,)

    def event(self) -> msgspec.Struct:
        return self.request


class RequestCancellation(_Append, frozen=True, tag="travel.RequestCancellation"):
    """Send a cancellation request to a service."""

    request: CancellationRequested
    emits = (CancellationRequested,)

    def event(self) -> msgspec.Struct:
        return self.request


class Trip(msgspec.Struct):
    """What the saga knows of its trip."""

    request: TripRequested | None = None
    refs: dict[str, str] = msgspec.field(default_factory=dict)


def _book(service: str) -> Any:
    def action(trip: Trip, trip_id: str) -> Command[Any]:
        asked = trip.request or TripRequested(trip_id)
        request = BookingRequested(
            trip_id,
            service,
            getattr(asked, service),
            fail=asked.fail_at == service,
            silent=asked.silent == service,
        )
        return RequestBooking(stream=StreamId(f"{service}-{trip_id}"), request=request)

    return action


def _cancel(service: str) -> Any:
    def compensation(trip: Trip, trip_id: str) -> Command[Any]:
        fail_times = trip.request.cancel_failures if trip.request else 0
        request = CancellationRequested(trip_id, service, fail_times)
        return RequestCancellation(stream=StreamId(f"{service}-{trip_id}"), request=request)

    return compensation


def _step(service: str) -> Step:
    return Step(
        name=service,
        action=_book(service),
        compensation=_cancel(service),
        done=(Booked,),
        failed=(BookingFailed,),
        compensated=(Cancelled,),
        compensation_failed=(CancellationFailed,),
        timeout=STEP_TIMEOUT,
    )


class TravelBooking(Saga):
    """Book hotel, flight and car; cancel what was booked if any step fails."""

    name = "travel-booking"
    steps = tuple(_step(service) for service in SERVICES)
    starts_with = (TripRequested,)
    commands = (RequestBooking, RequestCancellation)
    compensation_retry: ClassVar[RetryPolicy] = ExponentialBackoff(
        base=1.0, cap=30.0, max_retries=4
    )

    def correlate(self, event: RecordedEvent) -> str | None:
        """Every travel event carries its trip id."""
        trip_id: str | None = getattr(event.data, "trip_id", None)
        return trip_id

    def initial_data(self) -> Trip:
        """A trip not yet requested."""
        return Trip()

    def fold(self, data: Trip, event: RecordedEvent) -> Trip:
        """Keep the request and the booking references."""
        match event.data:
            case TripRequested() as request:
                data.request = request
            case Booked(service=service, ref=ref):
                data.refs[service] = ref
            case Cancelled(service=service):
                data.refs.pop(service, None)
        return data

    def reply_step(self, event: RecordedEvent) -> str | None:
        """Replies name their service, which is the step."""
        service: str | None = getattr(event.data, "service", None)
        return service


class _Reply(_Append, frozen=True, tag="travel.Reply"):
    reply: Booked | BookingFailed | Cancelled | CancellationFailed

    def event(self) -> msgspec.Struct:
        return self.reply


class _TravelService(EventHandler):
    """A simulated booking service; what it answers is in the request."""

    service: str = ""
    events = (BookingRequested, CancellationRequested)

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        """Answer one request (or, if told to be silent, never)."""
        request = event.data
        if request.service != self.service:
            return
        latency = float(os.environ.get("RSAGA_SERVICE_LATENCY_MS", "0"))
        if latency:
            await anyio.sleep(latency / 1000)
        stream = StreamId(event.stream_id)
        reply: Booked | BookingFailed | Cancelled | CancellationFailed
        if isinstance(request, BookingRequested):
            if request.silent:
                return
            if request.fail:
                reply = BookingFailed(request.trip_id, self.service, "sold out")
            else:
                reply = Booked(request.trip_id, self.service, f"{self.service}-{request.trip_id}")
        else:
            asked = sum(
                isinstance(e.data, CancellationRequested)
                for e in (await ctx.read(stream)).events[: event.version]
            )
            if asked <= request.fail_times:
                reply = CancellationFailed(request.trip_id, self.service, "system busy")
            else:
                reply = Cancelled(request.trip_id, self.service)
        await ctx.execute(_Reply(stream=stream, reply=reply))


class HotelService(_TravelService):
    """Books hotels."""

    name = "hotel-service"
    service = "hotel"


class FlightService(_TravelService):
    """Books flights."""

    name = "flight-service"
    service = "flight"


class CarService(_TravelService):
    """Rents cars."""

    name = "car-service"
    service = "car"
