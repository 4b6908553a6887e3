"""OpenTelemetry tracing as an interceptor (the ``rsaga[otel]`` extra).

`TracingInterceptor` opens a span around every handler call, command, process
step and timeout firing, and carries the W3C trace context (``traceparent``,
``tracestate``) in the metadata of what the call writes:

- a command's events carry the context of the command's span, so a handler or
  a process step that receives one of them, in any worker process, continues
  the trace as a child of the command that wrote it;
- a step's timeouts carry the context of the step's span in their payload, so a
  timeout firing days later, in whatever worker, continues the same trace.

Select it with ``interceptors = ["otel"]`` (``RSAGA_INTERCEPTORS=otel``); it
uses the global tracer provider, which the application configures (the
OpenTelemetry SDK, ``opentelemetry-instrument``...). rsaga imports this module
only when the interceptor is selected.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Span, SpanKind, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from rsaga.interceptors import (
    CommandInput,
    HandleInput,
    Interceptor,
    Metadata,
    Next,
    StepInput,
    TimeoutInput,
)

if TYPE_CHECKING:
    from rsaga.events import RecordedEvent
    from rsaga.executor import ExecutionResult

TRACER_NAME = "rsaga"


class TracingInterceptor(Interceptor):
    """A span per handler call, command, process step and timeout firing; the trace
    context travels in event metadata and timeout payloads.

    `tracer_provider` defaults to the global one; `propagator` to W3C trace context.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self.tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self.propagator = propagator or TraceContextTextMapPropagator()

    def _parent(self, metadata: Metadata | None) -> Context | None:
        """The context `metadata` carries; None (the current one) if it carries none."""
        if not metadata:
            return None
        context = self.propagator.extract(metadata)
        if not trace.get_current_span(context).get_span_context().is_valid:
            return None
        return context

    def _received(
        self, name: str, metadata: Metadata | None, attributes: dict[str, Any]
    ) -> AbstractContextManager[Span]:
        """A consumer span for something that arrived carrying `metadata`."""
        return self.tracer.start_as_current_span(
            name, context=self._parent(metadata), kind=SpanKind.CONSUMER, attributes=attributes
        )

    def _carry(self, metadata: Metadata | None) -> Metadata:
        """`metadata` with the current span's context injected."""
        carrier = dict(metadata or {})
        self.propagator.inject(carrier)
        return carrier

    async def handle(self, input: HandleInput, next: Next[HandleInput, None]) -> None:
        """A consumer span, child of the command that wrote the event."""
        event = input.event
        with self._received(
            f"rsaga.handle {input.group}",
            event.metadata,
            {
                "rsaga.group": input.group,
                "rsaga.event_type": event.type,
                "rsaga.event_id": event.event_id,
                "rsaga.stream_id": event.stream_id,
                "rsaga.version": event.version,
                "rsaga.attempt": input.attempt,
                "rsaga.correlation_id": event.correlation_id,
            },
        ):
            await next(input)

    async def execute_command(
        self, input: CommandInput, next: Next[CommandInput, ExecutionResult]
    ) -> ExecutionResult:
        """A span whose context the command's events carry."""
        with self.tracer.start_as_current_span(
            f"rsaga.command {input.command.metric_label()}",
            kind=SpanKind.PRODUCER,
            attributes={"rsaga.command": type(input.command).__name__},
        ) as span:
            input.metadata = self._carry(input.metadata)
            result = await next(input)
            span.set_attribute("rsaga.attempts", result.attempts)
            span.set_attribute("rsaga.duplicate", result.duplicate)
            span.set_attribute("rsaga.event_types", [e.type for e in result.events])
            return result

    async def process_step(
        self, input: StepInput, next: Next[StepInput, list[RecordedEvent]]
    ) -> list[RecordedEvent]:
        """A span whose context the step's timeouts carry."""
        with self.tracer.start_as_current_span(
            f"rsaga.step {input.process_type}",
            attributes={
                "rsaga.process_type": input.process_type,
                "rsaga.process_id": input.process_id,
                "rsaga.trigger": type(input.trigger).__name__,
                "rsaga.step_key": input.key,
            },
        ) as span:
            input.metadata = self._carry(input.metadata)
            events = await next(input)
            span.set_attribute("rsaga.event_types", [e.type for e in events])
            return events

    async def fire_timeout(
        self, input: TimeoutInput, next: Next[TimeoutInput, list[RecordedEvent]]
    ) -> list[RecordedEvent]:
        """A consumer span, child of the step that scheduled the timeout."""
        payload = input.payload
        with self._received(
            f"rsaga.timeout {payload.process_type}",
            payload.metadata,
            {
                "rsaga.process_type": payload.process_type,
                "rsaga.process_id": payload.process_id,
                "rsaga.timeout": payload.name,
                "rsaga.due_ms": payload.due_ms,
                "rsaga.attempt": input.attempt or 0,
            },
        ) as span:
            events = await next(input)
            span.set_attribute("rsaga.fired", any(e.type == "rsaga.TimeoutFired" for e in events))
            return events
