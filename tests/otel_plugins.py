"""The traced order world of tests/test_otel.py, for its worker subprocesses.

`TracedOrders` is the examples' order fulfilment with short waits and retries;
`FlakyPayment` ignores the first payment request of an order paid "flaky", so
its wait times out and the retry's timeout fires before the order completes.
`file_tracing` is an interceptor factory (``RSAGA_INTERCEPTORS=otel_plugins:file_tracing``)
that writes every finished span as one JSON line to ``$OTEL_TEST_SPANS_FILE``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import ClassVar

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from rsaga_examples.orders import (
    Delivered,
    InventoryReserved,
    InventoryService,
    OrderFulfilment,
    PaymentConfirmed,
    PaymentRequested,
    Shipped,
    ShippingService,
    _Reply,
)

from rsaga import EventHandler, FixedDelay, HandlerContext, RecordedEvent, RetryPolicy, StreamId
from rsaga.otel import TracingInterceptor


class TracedOrders(OrderFulfilment):
    """Order fulfilment that waits 0.3 s for a reply and retries after 0.2 s."""

    name = "traced-orders"
    wait_timeout: ClassVar[float] = 0.3
    retry: ClassVar[RetryPolicy] = FixedDelay(interval=0.2, max_retries=3)


class FlakyPayment(EventHandler):
    """Confirms every payment request, except the first of an order paid "flaky"."""

    name = "flaky-payment"
    events = (PaymentRequested,)
    decodes = (PaymentConfirmed,)  # what it writes: a worker running only services knows it

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        """Stay silent on a flaky order's first request; confirm every other one."""
        request: PaymentRequested = event.data
        if request.payment == "flaky" and event.version == 1:
            return
        await ctx.execute(
            _Reply(stream=StreamId(event.stream_id), reply=PaymentConfirmed(request.order_id))
        )



class TracedInventory(InventoryService):
    """The example's inventory service, knowing the reply it writes."""

    name = "traced-inventory"
    decodes = (InventoryReserved,)


class TracedShipping(ShippingService):
    """The example's shipping service, knowing the replies it writes."""

    name = "traced-shipping"
    decodes = (Shipped, Delivered)


class JsonLinesExporter(SpanExporter):
    """Appends each finished span to a file, one JSON object per line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a") as out:
            for span in spans:
                out.write(json.dumps(span_record(span)) + "\n")
        return SpanExportResult.SUCCESS


def span_record(span: ReadableSpan) -> dict[str, object]:
    """What the tests check of a span."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


def file_tracing() -> TracingInterceptor:
    """A tracing interceptor exporting to ``$OTEL_TEST_SPANS_FILE`` as spans end."""
    provider = TracerProvider(resource=Resource({"service.name": f"worker-{os.getpid()}"}))
    provider.add_span_processor(
        SimpleSpanProcessor(JsonLinesExporter(os.environ["OTEL_TEST_SPANS_FILE"]))
    )
    return TracingInterceptor(tracer_provider=provider)
