"""Order fulfilment: the process manager of EventCore's long-running-process chapter.

An order moves PaymentPending -> PaymentConfirmed -> InventoryReserved ->
Shipped -> Delivered -> Completed. Each waiting step sends a request (a
command on the service's stream), waits for the reply event with a timeout,
and on timeout retries the request per the process's retry policy; once the
retries are spent, or a service refuses, the order fails.

`PaymentService`, `InventoryService` and `ShippingService` simulate the
services: handlers that answer requests at once (tests and benchmarks may
leave them out and answer by hand).
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

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
from rsaga.retry import ExponentialBackoff, RetryPolicy

# --- events of the outside world ---------------------------------------------------


class OrderPlaced(msgspec.Struct, frozen=True, tag="orders.OrderPlaced"):
    """A customer placed an order (stream ``order-<id>``); starts the process."""

    order_id: str
    amount: int
    payment: str = "ok"
    """For the simulated payment service: "ok", "decline" or "silent" (never answers)."""


class PaymentRequested(msgspec.Struct, frozen=True, tag="orders.PaymentRequested"):
    """The process asked for payment (stream ``payment-<id>``)."""

    order_id: str
    amount: int
    payment: str = "ok"


class PaymentConfirmed(msgspec.Struct, frozen=True, tag="orders.PaymentConfirmed"):
    """The payment went through."""

    order_id: str


class PaymentDeclined(msgspec.Struct, frozen=True, tag="orders.PaymentDeclined"):
    """The payment was refused."""

    order_id: str
    reason: str


class InventoryRequested(msgspec.Struct, frozen=True, tag="orders.InventoryRequested"):
    """The process asked to reserve stock (stream ``inventory-<id>``)."""

    order_id: str


class InventoryReserved(msgspec.Struct, frozen=True, tag="orders.InventoryReserved"):
    """Stock is reserved."""

    order_id: str


class InventoryUnavailable(msgspec.Struct, frozen=True, tag="orders.InventoryUnavailable"):
    """Stock cannot be reserved."""

    order_id: str


class ShipmentRequested(msgspec.Struct, frozen=True, tag="orders.ShipmentRequested"):
    """The process asked for shipping (stream ``shipment-<id>``)."""

    order_id: str


class Shipped(msgspec.Struct, frozen=True, tag="orders.Shipped"):
    """The parcel left."""

    order_id: str


class Delivered(msgspec.Struct, frozen=True, tag="orders.Delivered"):
    """The parcel arrived."""

    order_id: str


WORLD_EVENTS = (
    OrderPlaced,
    PaymentRequested,
    PaymentConfirmed,
    PaymentDeclined,
    InventoryRequested,
    InventoryReserved,
    InventoryUnavailable,
    ShipmentRequested,
    Shipped,
    Delivered,
)

# --- commands the process issues ---------------------------------------------------------


class _Request(StatelessCommand, frozen=True):
    """Append one request event to a service's stream."""

    stream: StreamId
    order_id: str


    def request(self) -> msgspec.Struct:
        raise NotImplementedError

    def handle(self, state: None) -> Writes:
        return {self.stream: [self.request()]}


class RequestPayment(_Request, frozen=True, tag="orders.RequestPayment"):
    """Ask the payment service to charge `amount`."""

    amount: int
    payment: str = "ok"
    emits = (PaymentRequested,)

    def request(self) -> msgspec.Struct:
        return PaymentRequested(self.order_id, self.amount, self.payment)


class ReserveInventory(_Request, frozen=True, tag="orders.ReserveInventory"):
    """Ask the inventory service to reserve stock."""

    emits = (InventoryRequested,)

    def request(self) -> msgspec.Struct:
        return InventoryRequested(self.order_id)


class ShipOrder(_Request, frozen=True, tag="orders.ShipOrder"):
    """Ask the shipping service to ship."""

    emits = (ShipmentRequested,)

    def request(self) -> msgspec.Struct:
        return ShipmentRequested(self.order_id)


# --- the process -------------------------------------------------------------------------


class OrderAccepted(msgspec.Struct, frozen=True, tag="orders.OrderAccepted"):
    """The process took the order on (the process's own event)."""

    amount: int
    payment: str = "ok"


class StatusChanged(msgspec.Struct, frozen=True, tag="orders.StatusChanged"):
    """The order reached `status` (the process's own event)."""

    status: str


class Order(msgspec.Struct):
    """State of one order fulfilment process."""

    status: str = "New"
    amount: int = 0
    payment: str = "ok"


class _Wait(msgspec.Struct, frozen=True):
    """A waiting step: the status while waiting, and the reply that ends the wait."""

    status: str
    reply: type[msgspec.Struct]


class OrderFulfilment(ProcessManager[Order]):
    """Payment, inventory, shipping and delivery of one order, with timeouts and retries."""

    name = "order-fulfilment"
    events = (OrderPlaced, PaymentConfirmed, PaymentDeclined, InventoryReserved,
              InventoryUnavailable, Shipped, Delivered)
    state_events = (OrderAccepted, StatusChanged)
    commands = (RequestPayment, ReserveInventory, ShipOrder)
    decodes = (PaymentRequested, InventoryRequested, ShipmentRequested)
    # Example-sized: a silent service fails the order within about 35 s, so the
    # README's Procfile recipe ends in well under a minute.
    retry: ClassVar[RetryPolicy] = ExponentialBackoff(base=1.0, cap=10.0, max_retries=2)
    deadline = 24 * 3600.0

    wait_timeout: ClassVar[float] = 10.0
    """Seconds to wait for each service's reply before retrying the request."""

    WAITS: ClassVar[dict[str, _Wait]] = {
        "payment": _Wait("PaymentPending", PaymentConfirmed),
        "inventory": _Wait("PaymentConfirmed", InventoryReserved),
        "shipping": _Wait("InventoryReserved", Shipped),
        "delivery": _Wait("Shipped", Delivered),
    }

    def correlate(self, event: RecordedEvent) -> str | None:
        """Every event of the order's world carries its order id."""
        order_id: str | None = getattr(event.data, "order_id", None)
        return order_id

    def initial_state(self) -> Order:
        """A new order."""
        return Order()

    def apply(self, state: Order, event: RecordedEvent) -> Order:
        """Fold the process's own events."""
        match event.data:
            case OrderAccepted(amount=amount, payment=payment):
                state.amount, state.payment = amount, payment
            case StatusChanged(status=status):
                state.status = status
        return state

    def _request(self, step: str, order_id: str, amount: int, payment: str) -> Command[None]:
        if step == "payment":
            return RequestPayment(
                stream=StreamId(f"payment-{order_id}"),
                order_id=order_id,
                amount=amount,
                payment=payment,
            )
        if step == "inventory":
            return ReserveInventory(stream=StreamId(f"inventory-{order_id}"), order_id=order_id)
        return ShipOrder(stream=StreamId(f"shipment-{order_id}"), order_id=order_id)

    def _enter(self, step: str, order_id: str, state: Order) -> Decision:
        """Move to `step`'s waiting status: send its request, start its timeout."""
        wait = self.WAITS[step]
        commands = (
            [] if step == "delivery"
            else [self._request(step, order_id, state.amount, state.payment)]
        )
        return Decision(
            events=[StatusChanged(wait.status)],
            commands=commands,
            schedule=[Timeout(f"{step}-wait", self.wait_timeout)],
        )

    def decide(self, state: Order, trigger: Trigger, process: ProcessInfo) -> Decision:
        """Advance on replies; retry a request whose reply is late; fail on refusals."""
        order_id = process.process_id
        match trigger:
            case EventTrigger(event=RecordedEvent(data=OrderPlaced(amount=amount, payment=pay))):
                if state.status != "New":
                    return Decision()
                entered = self._enter("payment", order_id, Order(amount=amount, payment=pay))
                return msgspec.structs.replace(
                    entered, events=[OrderAccepted(amount, pay), *entered.events]
                )
            case EventTrigger(event=RecordedEvent(data=PaymentDeclined(reason=reason))):
                return Decision(fail=f"payment declined: {reason}")
            case EventTrigger(event=RecordedEvent(data=InventoryUnavailable())):
                return Decision(fail="inventory unavailable")
            case EventTrigger(event=RecordedEvent(data=data)):
                for step, wait in self.WAITS.items():
                    if isinstance(data, wait.reply) and state.status == wait.status:
                        if step == "delivery":
                            return Decision(
                                events=[StatusChanged("Delivered"), StatusChanged("Completed")],
                                complete=True,
                            )
                        entered = self._enter(_NEXT[step], order_id, state)
                        return msgspec.structs.replace(entered, cancel=[f"{step}-wait"])
                return Decision()
            case TimeoutTrigger(name=name) if name.endswith("-wait"):
                return Decision(retry=name.removesuffix("-wait"))
            case TimeoutTrigger(name=step) if step in self.WAITS:
                return self._enter(step, order_id, state)
        return Decision()


_NEXT = {"payment": "inventory", "inventory": "shipping", "shipping": "delivery"}


# --- simulated services ------------------------------------------------------------------


class _Reply(StatelessCommand, frozen=True):
    """Append a reply event to a service stream."""

    stream: StreamId
    reply: msgspec.Struct


    def handle(self, state: None) -> Writes:
        return {self.stream: [self.reply]}


class PaymentService(EventHandler):
    """Answers payment requests at once, as the order asked it to (see `OrderPlaced`)."""

    name = "payment-service"
    events = (PaymentRequested,)

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        """Reply PaymentConfirmed, PaymentDeclined, or nothing."""
        request: PaymentRequested = event.data
        if request.payment == "silent":
            return
        reply: msgspec.Struct = PaymentConfirmed(request.order_id)
        if request.payment == "decline":
            reply = PaymentDeclined(request.order_id, "card declined")
        await ctx.execute(_Reply(stream=StreamId(event.stream_id), reply=reply))


class InventoryService(EventHandler):
    """Reserves stock for every request at once."""

    name = "inventory-service"
    events = (InventoryRequested,)

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        """Reply InventoryReserved."""
        order_id = event.data.order_id
        await ctx.execute(
            _Reply(stream=StreamId(event.stream_id), reply=InventoryReserved(order_id))
        )


class ShippingService(EventHandler):
    """Ships and delivers every order at once."""

    name = "shipping-service"
    events = (ShipmentRequested,)

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        """Reply Shipped, then Delivered."""
        order_id = event.data.order_id
        stream = StreamId(event.stream_id)
        await ctx.execute(_Reply(stream=stream, reply=Shipped(order_id)))
        await ctx.execute(_Reply(stream=stream, reply=Delivered(order_id)))
