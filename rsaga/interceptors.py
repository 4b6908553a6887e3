"""Interceptors: middleware around every call the runtime makes into user code and Redis.

Four kinds of call go through a chain of interceptors, outermost first:

- `Interceptor.handle`: a handler (or a process manager's event trigger) called
  with one event from a shard log, per attempt (`HandleInput`);
- `Interceptor.execute_command`: one command executed by the `Executor`, conflict
  retries included (`CommandInput`, returns the `ExecutionResult`);
- `Interceptor.process_step`: one process step, a trigger applied to one process
  (`StepInput`, returns the events the step wrote);
- `Interceptor.fire_timeout`: a due timeout delivered to its process
  (`TimeoutInput`, returns the events the step wrote: none if discarded).

Each method gets the call's input, which says what the call is about, and a
`next` to call with it (or not: an interceptor may refuse, retry or time out
the call). The input objects are mutable on purpose: `metadata`, where there is
one, travels with what the call writes (the events of a command, the timeouts a
step schedules) and comes back on the events and timeouts that later calls
receive, which is how `rsaga.otel` carries a trace across workers and days.

An interceptor overrides only what it needs; the chain of each kind is
composed once (`Interceptors`), and a kind no interceptor overrides calls the
runtime directly. Interceptors are selected by name in the ``interceptors``
setting (`resolve`): ``metrics`` (Prometheus), ``otel`` (OpenTelemetry, the
``rsaga[otel]`` extra), any name of the ``rsaga.interceptors`` entry point
group, or a ``module:attribute`` import path; each names a factory called with
no arguments (or an `Interceptor` instance).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

from rsaga.errors import ConfigError

if TYPE_CHECKING:
    from rsaga.commands import Executable
    from rsaga.events import RecordedEvent
    from rsaga.executor import ExecutionResult
    from rsaga.process.api import ProcessManager
    from rsaga.process.timeouts import TimeoutPayload

ENTRY_POINT_GROUP = "rsaga.interceptors"
"""Entry point group naming interceptor factories."""

Metadata = dict[str, str]
"""String pairs carried with events and timeouts (for example a W3C ``traceparent``)."""


@dataclass(slots=True)
class HandleInput:
    """A handler called with one event from a shard log (one attempt)."""

    group: str
    """The handler's name, or the process type for a process manager's trigger."""
    event: RecordedEvent
    """The event handled; its `metadata` is what the command that wrote it carried."""
    attempt: int
    """1 on the first attempt, more after the handler raised."""
    log_id: str
    """The shard-log entry id."""
    process: bool = False
    """True for a process manager's event trigger (then `process_step` follows)."""


@dataclass(slots=True)
class CommandInput:
    """One command executed by the `Executor` (conflict retries included)."""

    command: Executable[Any]
    """The command; ``command.metric_label()`` names it (a process type for a step)."""
    correlation_id: str | None
    causation_id: str | None
    idempotency_key: str | None
    metadata: Metadata | None = None
    """Carried by every event the command writes; interceptors may set or extend it."""


@dataclass(slots=True)
class StepInput:
    """One process step: a trigger applied to one process."""

    manager: ProcessManager[Any]
    """The process type's manager (``manager.name`` is the process type)."""
    process_id: str
    trigger: Any
    """The `Trigger` (or an operator action)."""
    key: str
    """The step's idempotency key."""
    correlation_id: str | None
    causation_id: str | None
    attempt: int | None
    """The worker's attempt at the trigger; None when not run by a worker."""
    metadata: Metadata | None = None
    """Carried by the step's events and by the timeouts it schedules."""

    @property
    def process_type(self) -> str:
        """The process type."""
        return self.manager.name


@dataclass(slots=True)
class TimeoutInput:
    """A due timeout delivered to its process."""

    payload: TimeoutPayload
    """Process type and id, timeout name, due time, and the `metadata` of the step
    that scheduled it."""
    attempt: int | None
    """The worker's attempt at this delivery; None when not run by a worker."""
    group: str | None = None
    """The consumer group that delivered it; None when not run by a worker."""


In = TypeVar("In")
Out = TypeVar("Out")

Next = Callable[[In], Awaitable[Out]]
"""What an interceptor calls to go on: the next interceptor, or the runtime."""


class Interceptor:
    """Base of interceptors: every method calls `next` unchanged. Override what you need."""

    async def handle(self, input: HandleInput, next: Next[HandleInput, None]) -> None:
        """Around a handler call."""
        await next(input)

    async def execute_command(
        self, input: CommandInput, next: Next[CommandInput, ExecutionResult]
    ) -> ExecutionResult:
        """Around a command execution."""
        return await next(input)

    async def process_step(
        self, input: StepInput, next: Next[StepInput, list[RecordedEvent]]
    ) -> list[RecordedEvent]:
        """Around a process step."""
        return await next(input)

    async def fire_timeout(
        self, input: TimeoutInput, next: Next[TimeoutInput, list[RecordedEvent]]
    ) -> list[RecordedEvent]:
        """Around a timeout firing."""
        return await next(input)


def _link(
    method: Callable[[In, Next[In, Out]], Awaitable[Out]], after: Next[In, Out]
) -> Next[In, Out]:
    def call(input: In) -> Awaitable[Out]:
        return method(input, after)

    return call


class Interceptors:
    """A fixed chain of interceptors; composes each kind of call once, at set-up."""

    def __init__(self, interceptors: Iterable[Interceptor] = ()) -> None:
        self.interceptors: tuple[Interceptor, ...] = tuple(interceptors)
        for item in self.interceptors:
            if not isinstance(item, Interceptor):
                raise ConfigError(f"{item!r} is not an rsaga Interceptor")

    def __bool__(self) -> bool:
        return bool(self.interceptors)

    def _compose(self, kind: str, terminal: Next[In, Out]) -> Next[In, Out]:
        chain = terminal
        default = getattr(Interceptor, kind)
        for item in reversed(self.interceptors):
            if getattr(type(item), kind) is not default:
                chain = _link(getattr(item, kind), chain)
        return chain

    def handle(self, terminal: Next[HandleInput, None]) -> Next[HandleInput, None]:
        """`terminal` (the handler call) wrapped by every interceptor's `handle`."""
        return self._compose("handle", terminal)

    def execute_command(
        self, terminal: Next[CommandInput, ExecutionResult]
    ) -> Next[CommandInput, ExecutionResult]:
        """`terminal` (the execution) wrapped by every interceptor's `execute_command`."""
        return self._compose("execute_command", terminal)

    def process_step(
        self, terminal: Next[StepInput, list[RecordedEvent]]
    ) -> Next[StepInput, list[RecordedEvent]]:
        """`terminal` (the step) wrapped by every interceptor's `process_step`."""
        return self._compose("process_step", terminal)

    def fire_timeout(
        self, terminal: Next[TimeoutInput, list[RecordedEvent]]
    ) -> Next[TimeoutInput, list[RecordedEvent]]:
        """`terminal` (the timeout's step) wrapped by every interceptor's `fire_timeout`."""
        return self._compose("fire_timeout", terminal)


NO_INTERCEPTORS = Interceptors()
"""The default: calls go straight to the runtime."""

BUILTIN: dict[str, str] = {
    "metrics": "rsaga.metrics:PrometheusObserver",
    "otel": "rsaga.otel:TracingInterceptor",
}
"""Interceptor names rsaga knows without an entry point."""


def _load(path: str, what: str) -> Any:
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split(".") if attribute else ():
            target = getattr(target, part)
    except ImportError as exc:
        raise ConfigError(f"interceptors: {what} cannot be imported: {exc}") from None
    except AttributeError:
        raise ConfigError(f"interceptors: {what}: {path} does not exist") from None
    return target


def _build(target: Any, what: str) -> Interceptor:
    item = target() if callable(target) and not isinstance(target, Interceptor) else target
    if not isinstance(item, Interceptor):
        raise ConfigError(f"interceptors: {what} did not give an rsaga.Interceptor: {item!r}")
    return item


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def unknown_names(names: Sequence[str]) -> str | None:
    """Why `names` cannot all be interceptors without importing anything, or None."""
    if not names:
        return None
    plugins = _plugins()
    for name in names:
        if name not in plugins and name not in BUILTIN and ":" not in name:
            known = sorted({*BUILTIN, *plugins})
            return (
                f"interceptors: unknown interceptor {name!r} (known: {', '.join(known)}; "
                "or give module:attribute)"
            )
    return None


def resolve(names: Sequence[str]) -> list[Interceptor]:
    """One interceptor per name, in order (outermost first); `ConfigError` for unknown names.

    A name is a built-in (``metrics``, ``otel``), an entry point of the
    ``rsaga.interceptors`` group, or a ``module:attribute`` import path.
    """
    unknown = unknown_names(names)
    if unknown:
        raise ConfigError(unknown)
    plugins = _plugins()
    found: list[Interceptor] = []
    for name in names:
        if name in plugins:
            ep = plugins[name]
            try:
                target = ep.load()
            except Exception as exc:
                raise ConfigError(
                    f"interceptors: entry point {name} ({ep.value}) failed to load: {exc}"
                ) from None
        elif name in BUILTIN:
            extra = " of the rsaga[otel] extra" if name == "otel" else ""
            target = _load(BUILTIN[name], f"{name!r} ({BUILTIN[name]}{extra})")
        else:
            target = _load(name, repr(name))
        found.append(_build(target, repr(name)))
    return found
