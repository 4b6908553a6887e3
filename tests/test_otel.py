"""Interceptors and OpenTelemetry: the chain, its selection, the envelope's metadata,
and one trace following an order across handlers, processes, timers and processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from otel_plugins import FlakyPayment, TracedOrders, span_record
from redis.asyncio import Redis
from rsaga_examples.orders import (
    WORLD_EVENTS,
    Delivered,
    InventoryService,
    OrderPlaced,
    ShippingService,
)

from rsaga import (
    ConfigError,
    EventRegistry,
    EventStore,
    Executor,
    FixedDelay,
    Interceptor,
    Keyspace,
    RetryPolicy,
    StatelessCommand,
    StreamId,
    Worker,
    Writes,
)
from rsaga.config import WorkerSettings, load_settings
from rsaga.events import EventCodec
from rsaga.interceptors import (
    CommandInput,
    HandleInput,
    Interceptors,
    Next,
    StepInput,
    TimeoutInput,
    resolve,
)
from rsaga.metrics import PrometheusObserver
from rsaga.otel import TracingInterceptor
from rsaga.process.timeouts import decode_timeout
from rsaga.runtime.scheduler import Scheduler

ROOT = Path(__file__).resolve().parent.parent

OLD_ENVELOPE = bytes.fromhex(
    "97c4100123456789abcdef0123456789abcdefb06f72646572732e44656c697665726564cf0000018bcfe568"
    "00a4636f7272c082a474797065b06f72646572732e44656c697665726564a86f726465725f6964a26f31c0"
)
"""A `Delivered` event as envelopes were encoded before they had metadata (7 fields)."""


def test_an_envelope_written_before_metadata_still_decodes() -> None:
    codec = EventCodec(EventRegistry(WORLD_EVENTS))
    event = codec.decode("shipment-o1", 3, OLD_ENVELOPE)
    assert event.data == Delivered("o1")
    assert event.event_id == "0123456789abcdef0123456789abcdef"
    assert (event.correlation_id, event.causation_id, event.command_id) == ("corr", None, None)
    assert event.metadata is None


def test_metadata_round_trips_and_envelopes_without_it_are_unchanged() -> None:
    codec = EventCodec(EventRegistry(WORLD_EVENTS))
    fields: dict[str, Any] = {
        "event_id": "0123456789abcdef0123456789abcdef", "occurred_at_ms": 1700000000000,
        "correlation_id": "corr", "causation_id": None,
    }
    assert codec.encode(Delivered("o1"), **fields) == OLD_ENVELOPE, "unchanged without metadata"
    assert codec.encode(Delivered("o1"), **fields, metadata={}) == OLD_ENVELOPE
    blob = codec.encode(Delivered("o1"), **fields, metadata={"traceparent": "00-ab-cd-01"})
    assert codec.decode("s", 1, blob).metadata == {"traceparent": "00-ab-cd-01"}


# --- the chain ----------------------------------------------------------------------------


class Note(msgspec.Struct, frozen=True):
    """Something noted."""

    text: str


class WriteNote(StatelessCommand, frozen=True):
    """Append one note."""

    stream: StreamId
    text: str

    def handle(self, state: None) -> Writes:
        return {self.stream: [Note(self.text)]}


class Recording(Interceptor):
    """Records what it wraps, in `log`, before and after."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def execute_command(self, input: CommandInput, next: Next[CommandInput, Any]) -> Any:
        self.log.append(f"{self.name}>")
        input.metadata = {**(input.metadata or {}), self.name: "1"}
        result = await next(input)
        self.log.append(f"<{self.name}")
        return result


class Refusing(Interceptor):
    """Refuses every command without running it."""

    async def execute_command(self, input: CommandInput, next: Next[CommandInput, Any]) -> Any:
        raise PermissionError(f"{type(input.command).__name__} refused")


async def test_interceptors_wrap_commands_in_order_and_metadata_reaches_the_events(
    redis: Redis, prefix: str
) -> None:
    store = EventStore(redis, EventRegistry([Note]), keyspace=Keyspace(prefix=prefix))
    log: list[str] = []
    executor = Executor(store, interceptors=[Recording("a", log), Recording("b", log)])
    result = await executor.execute(WriteNote(stream=StreamId("note-1"), text="hi"))
    assert log == ["a>", "b>", "<b", "<a"]
    [event] = (await store.read("note-1")).events
    assert event.metadata == {"a": "1", "b": "1"}
    assert result.events[0].metadata == {"a": "1", "b": "1"}
    refusing = Executor(store, interceptors=[Refusing()])
    with pytest.raises(PermissionError, match="WriteNote refused"):
        await refusing.execute(WriteNote(stream=StreamId("note-1"), text="no"))
    assert (await store.read("note-1")).version == 1


def test_a_kind_no_interceptor_overrides_calls_the_runtime_directly() -> None:
    async def terminal(call: HandleInput) -> None:
        return None

    chain = Interceptors([Recording("a", [])])
    assert chain.handle(terminal) is terminal
    assert chain.execute_command(terminal) is not terminal  # type: ignore[arg-type]
    assert Interceptors().fire_timeout(terminal) is terminal  # type: ignore[arg-type]


def test_interceptors_are_selected_by_name_module_path_or_entry_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics, traced, custom = resolve(["metrics", "otel", f"{__name__}:FromEntryPoint"])
    assert isinstance(metrics, PrometheusObserver)
    assert isinstance(traced, TracingInterceptor)
    assert isinstance(custom, FromEntryPoint)
    with pytest.raises(ConfigError, match=r"unknown interceptor 'tracing'.*metrics, otel"):
        resolve(["tracing"])
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve(["no_such_module:thing"])
    with pytest.raises(ConfigError, match=r"did not give an rsaga\.Interceptor"):
        resolve(["otel_plugins:TracedOrders"])
    monkeypatch.setenv("RSAGA_INTERCEPTORS", "metrics, otel")
    assert load_settings(None).worker.interceptors == ["metrics", "otel"]
    monkeypatch.setenv("RSAGA_INTERCEPTORS", "metrics,tracing")
    with pytest.raises(ConfigError, match="unknown interceptor 'tracing'"):
        load_settings(None)


class FromEntryPoint(Interceptor):
    """Registered under the ``rsaga.interceptors`` group by the test below."""


def test_an_entry_point_names_an_interceptor(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    import rsaga.interceptors

    point = EntryPoint("mine", f"{__name__}:FromEntryPoint", "rsaga.interceptors")
    monkeypatch.setattr(rsaga.interceptors, "entry_points", lambda group: [point])
    [found] = resolve(["mine"])
    assert isinstance(found, FromEntryPoint)


class EveryOther:
    """A retry policy that is no built-in: waits 0 s, for at most `max_retries` retries."""

    max_retries = 2

    def delay(self, retry: int) -> float | None:
        return 0.0 if retry <= self.max_retries else None


def test_any_object_with_delay_and_max_retries_is_a_retry_policy() -> None:
    assert isinstance(EveryOther(), RetryPolicy)
    assert isinstance(FixedDelay(), RetryPolicy)
    assert not isinstance(object(), RetryPolicy)


async def test_a_custom_retry_policy_drives_command_retries(redis: Redis, prefix: str) -> None:
    store = EventStore(redis, EventRegistry([Note]), keyspace=Keyspace(prefix=prefix))
    executor = Executor(store, retry=EveryOther())
    assert (await executor.execute(WriteNote(stream=StreamId("n"), text="x"))).attempts == 1
    assert executor._delay(3) is None
    assert executor._delay(1) == 0.0


# --- tracing ------------------------------------------------------------------------------


def provider_with(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


async def place_order(store: EventStore, provider: TracerProvider, order_id: str) -> str:
    """Append a flaky-paid order inside a root span; its trace id."""
    with provider.get_tracer("test").start_as_current_span("place order") as root:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        await store.append(f"order-{order_id}", [OrderPlaced(order_id, 10, "flaky")],
                           metadata=carrier)
    return f"{root.get_span_context().trace_id:032x}"


def ancestry(spans: list[dict[str, Any]], span: dict[str, Any]) -> list[dict[str, Any]]:
    """`span` and its ancestors, up to the root; every parent must be among `spans`."""
    by_id = {s["span_id"]: s for s in spans}
    chain = [span]
    while chain[-1]["parent_id"] is not None:
        parent = by_id.get(chain[-1]["parent_id"])
        assert parent is not None, f"{chain[-1]['name']} has a parent that was not exported"
        chain.append(parent)
    return chain


def check_trace(spans: list[dict[str, Any]], trace_id: str) -> list[dict[str, Any]]:
    """One trace from OrderPlaced to ProcessCompleted, through both timeouts; the chain."""
    assert {s["trace_id"] for s in spans} == {trace_id}, "every span is in the order's trace"
    roots = [s for s in spans if s["parent_id"] is None]
    assert [r["name"] for r in roots] == ["place order"]
    [completed] = [
        s for s in spans if s["name"] == "rsaga.command traced-orders"
        and "rsaga.ProcessCompleted" in s["attributes"].get("rsaga.event_types", ())
    ]
    chain = ancestry(spans, completed)
    names = [s["name"] for s in reversed(chain)]
    timeouts = [s["attributes"]["rsaga.timeout"] for s in reversed(chain)
                if s["name"] == "rsaga.timeout traced-orders"]
    assert timeouts == ["payment-wait", "payment"], names
    assert names[:3] == ["place order", "rsaga.handle traced-orders", "rsaga.step traced-orders"]
    for kind in ("payment", "inventory", "shipping"):
        assert any(n.startswith("rsaga.handle") and kind in n for n in names), names
    for n, span in enumerate(chain[:-1]):  # what each kind of span is the child of
        parent = chain[n + 1]["name"]
        if span["name"].startswith("rsaga.handle"):
            assert parent.startswith("rsaga.command") or parent == "place order", (span, parent)
        if span["name"].startswith("rsaga.timeout"):
            assert parent == "rsaga.step traced-orders"
            assert span["attributes"]["rsaga.fired"] is True
        if span["name"] == "rsaga.step traced-orders":
            assert parent.startswith(("rsaga.handle traced-orders", "rsaga.timeout")), parent
    return chain


async def wait_completed(store: EventStore, redis: Redis, process_type: str, n: int) -> None:
    key = store.keyspace.process_stats(0, process_type)
    while int((await redis.hgetall(key)).get(b"completed", 0)) < n:
        await anyio.sleep(0.05)


async def test_one_trace_follows_an_order_through_handlers_steps_and_timeouts(
    redis: Redis, prefix: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = provider_with(exporter)
    store = EventStore(redis, EventRegistry(WORLD_EVENTS), keyspace=Keyspace(prefix=prefix))
    executor = Executor(store, interceptors=[TracingInterceptor(tracer_provider=provider)])
    handlers = [TracedOrders(), FlakyPayment(), InventoryService(), ShippingService()]
    worker = Worker(executor, handlers, settings=WorkerSettings(block_ms=50))
    stop = anyio.Event()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            tg.start_soon(Scheduler(redis, store.keyspace, max_sleep=0.05).run, stop)
            trace_id = await place_order(store, provider, "o1")
            await wait_completed(store, redis, "traced-orders", 1)
            stop.set()
    spans = [span_record(s) for s in exporter.get_finished_spans()]
    check_trace(spans, trace_id)


async def test_without_tracing_nothing_is_carried(redis: Redis, prefix: str) -> None:
    store = EventStore(redis, EventRegistry([Note]), keyspace=Keyspace(prefix=prefix))
    await Executor(store).execute(WriteNote(stream=StreamId("n"), text="x"))
    assert (await store.read("n")).events[0].metadata is None


# --- across worker processes --------------------------------------------------------------


PLUGINS = ("TracedOrders", "FlakyPayment", "TracedInventory", "TracedShipping")


def worker_logs(where: Path) -> str:
    return "\n".join(p.read_text()[-2000:] for p in where.glob("*.log"))


@pytest.fixture
def workers_of(tmp_path: Path, prefix: str) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(url: str, name: str, handlers: list[str]) -> Path:
        spans = tmp_path / f"{name}.spans"
        spans.touch()
        log = (tmp_path / f"{name}.log").open("ab")
        started.append(subprocess.Popen(
            [sys.executable, "-m", "rsaga.cli", "worker",
             *[a for h in handlers for a in ("--handler", h)]],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("RSAGA_")},
                "RSAGA_REDIS_URL": url, "RSAGA_PREFIX": prefix,
                "RSAGA_HANDLERS": ",".join(f"otel_plugins:{name}" for name in PLUGINS),
                "RSAGA_INTERCEPTORS": "otel_plugins:file_tracing",
                "RSAGA_WORKER_BLOCK_MS": "100",
                "OTEL_TEST_SPANS_FILE": str(spans),
                "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "handlers")]),
            },
        ))
        return spans

    yield start
    for process in started:
        process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.mark.real_redis
async def test_one_trace_follows_an_order_across_two_worker_processes(
    real_redis_url: str, prefix: str, workers_of: Any, tmp_path: Path
) -> None:
    # The process runs in one worker, the services in the other: every reply
    # crosses between them, and so does the trace.
    orders_spans = workers_of(real_redis_url, "orders", ["traced-orders"])
    services_spans = workers_of(
        real_redis_url, "services", ["flaky-payment", "traced-inventory", "traced-shipping"]
    )
    redis = Redis.from_url(real_redis_url)
    exporter = InMemorySpanExporter()
    provider = provider_with(exporter)
    store = EventStore(redis, EventRegistry(WORLD_EVENTS), keyspace=Keyspace(prefix=prefix))

    def read_spans() -> list[dict[str, Any]]:
        lines = [*orders_spans.read_text().splitlines(), *services_spans.read_text().splitlines()]
        return [json.loads(line) for line in lines]

    def step_finished() -> bool:
        return any(
            s["name"] == "rsaga.step traced-orders"
            and "rsaga.ProcessCompleted" in s["attributes"].get("rsaga.event_types", ())
            for s in read_spans()
        )

    stop = anyio.Event()
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(Scheduler(redis, store.keyspace, max_sleep=0.05).run, stop)
                trace_id = await place_order(store, provider, "x1")
                await wait_completed(store, redis, "traced-orders", 1)
                while not step_finished():  # the worker ends the step's span after the commit
                    await anyio.sleep(0.05)
                stop.set()
    except TimeoutError:
        raise AssertionError(f"the order did not complete:\n{worker_logs(tmp_path)}") from None
    finally:
        await redis.aclose()
    spans = [*(span_record(s) for s in exporter.get_finished_spans()), *read_spans()]
    chain = check_trace(spans, trace_id)
    pids = {s["pid"] for s in chain if s["name"] != "place order"}
    assert len(pids) == 2, "the chain runs through both workers"
    assert os.getpid() not in pids
    timeout_pids = {s["pid"] for s in chain if s["name"].startswith("rsaga.timeout")}
    assert len(timeout_pids) == 1


def test_inputs_describe_their_call() -> None:
    step = StepInput(TracedOrders(), "o1", None, "k", None, None, 1)
    assert step.process_type == "traced-orders"
    assert TimeoutInput(decode_timeout(b"\x96\xa1t\xa1p\xa1n\xa1k\x01\x02"), 1).group is None


def test_rsaga_runs_without_opentelemetry_installed() -> None:
    script = """
import sys
sys.modules["opentelemetry"] = None  # as if not installed: importing it fails
import anyio
import rsaga, rsaga.cli, rsaga.worker
from rsaga import ConfigError, EventRegistry, EventStore, Executor
from rsaga.interceptors import resolve
from rsaga.testing import fake_redis
assert "rsaga.otel" not in sys.modules
[metrics] = resolve(["metrics"])
try:
    resolve(["otel"])
except ConfigError as exc:
    print(exc)

async def main():
    store = EventStore(fake_redis(), EventRegistry([]))
    Executor(store, interceptors=[metrics])

anyio.run(main)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "of the rsaga[otel] extra) cannot be imported" in done.stdout
