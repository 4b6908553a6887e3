"""Event handlers: the plugin API that `rsaga worker` runs over the shard logs.

A handler names its consumer group, lists the event types it wants, and
handles one event at a time with a `HandlerContext` that executes commands
(correlation and causation ids taken from the event) and reads streams.

Handlers are found through the entry-point group ``rsaga.handlers`` (each entry
point names an `EventHandler` subclass) or by import path (``module:Class``)
in the config.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from rsaga.commands import Command
from rsaga.errors import ConfigError, ValidationError
from rsaga.events import RecordedEvent
from rsaga.executor import ExecutionResult, Executor
from rsaga.names import check_name
from rsaga.retry import ExponentialBackoff, RetryPolicy
from rsaga.store import EventStore, StreamSlice

if TYPE_CHECKING:
    from rsaga.process.api import ProcessManager

ENTRY_POINT_GROUP = "rsaga.handlers"


class HandlerContext:
    """What a handler can do while it handles one event."""

    def __init__(
        self,
        event: RecordedEvent,
        *,
        executor: Executor,
        handler: str,
        log_id: str,
        attempt: int,
    ) -> None:
        self.event = event
        """The event being handled."""
        self.handler = handler
        """The handler's name (its consumer group)."""
        self.log_id = log_id
        """The shard-log entry id that carried the event."""
        self.attempt = attempt
        """1 on the first attempt, more on retries (in-process and after redelivery)."""
        self._executor = executor
        self._commands = 0

    @property
    def store(self) -> EventStore:
        """The event store."""
        return self._executor.store

    async def execute(self, command: Command[Any]) -> ExecutionResult:
        """Execute `command`, caused by this event and in its correlation, effect once.

        The n-th command a handler executes for an event gets the idempotency key
        ``<handler>:<event id>:<n>``, so when the event is delivered again (after a
        crash, a claim or a retry) a command that already wrote writes nothing.
        This holds as long as the handler issues the same commands in the same
        order for the same event.
        """
        self._commands += 1
        return await self._executor.execute(
            command,
            correlation_id=self.event.correlation_id,
            causation_id=self.event.event_id,
            idempotency_key=f"{self.handler}:{self.event.event_id}:{self._commands}",
        )

    async def read(self, stream_id: str, *, from_version: int = 1) -> StreamSlice:
        """Read a stream."""
        return await self._executor.store.read(stream_id, from_version=from_version)


class EventHandler:
    """Base class of event handlers.

    Subclasses set `name` and `events` and define `handle`. Events of other
    types are acknowledged without reaching `handle`.
    """

    name: ClassVar[str]
    """Unique name; also the consumer group's name. Letters, digits, ``._-``."""
    events: ClassVar[tuple[type[msgspec.Struct], ...]] = ()
    """The event types delivered to `handle`."""
    decodes: ClassVar[tuple[type[msgspec.Struct], ...]] = ()
    """Further event types this handler's commands read (registered, not delivered)."""
    retry: ClassVar[RetryPolicy] = ExponentialBackoff(base=0.1, cap=10.0, max_retries=4)
    """Retries of a raising `handle` before the event goes to dead letters."""
    claim_timeout: ClassVar[float] = 30.0
    """Seconds an entry may sit unacknowledged on a silent consumer before others take it."""

    async def handle(self, event: RecordedEvent, ctx: HandlerContext) -> None:
        """Handle one event; raise to have it retried, then dead-lettered."""
        raise NotImplementedError

    @classmethod
    def validate(cls) -> None:
        """Raise `ValidationError` if the class is not a usable handler."""
        name = check_name(cls)
        if not cls.events:
            raise ValidationError(f"handler {name} lists no event types in `events`")
        for event_type in (*cls.events, *cls.decodes):
            if not (isinstance(event_type, type) and issubclass(event_type, msgspec.Struct)):
                raise ValidationError(f"handler {name}: {event_type!r} is not a msgspec.Struct")
        if cls.claim_timeout <= 0:
            raise ValidationError(f"handler {name}: claim_timeout must be > 0")


@dataclass(frozen=True)
class InstalledHandler:
    """A handler (or process manager) class and where it was found."""

    handler: type[EventHandler] | type[ProcessManager[Any]]
    source: str


def _load(target: Any, source: str) -> InstalledHandler:
    from rsaga.process.api import ProcessManager

    if not (isinstance(target, type) and issubclass(target, EventHandler | ProcessManager)):
        raise ConfigError(
            f"{source}: {target!r} is not an EventHandler or ProcessManager subclass"
        )
    try:
        target.validate()
    except ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return InstalledHandler(target, source)


def import_handler(path: str) -> InstalledHandler:
    """Import ``module:Class`` and check it is an `EventHandler` subclass."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"handler import path {path!r} must look like 'package.module:Class'")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"handler {path!r} cannot be imported: {exc}") from None
    except Exception as exc:  # the module itself raised while being imported
        raise ConfigError(
            f"handler {path!r} failed at import: {type(exc).__name__}: {exc}"
        ) from exc
    return _load(target, f"import path {path}")


def discover_handlers(import_paths: Iterable[str] = ()) -> list[InstalledHandler]:
    """Every handler from the ``rsaga.handlers`` entry points and `import_paths`.

    Two handlers with the same name are a `ConfigError`.
    """
    found: list[InstalledHandler] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        try:
            target = ep.load()
        except Exception as exc:
            raise ConfigError(f"entry point {ep.name} ({ep.value}) failed to load: {exc}") from exc
        found.append(_load(target, f"entry point {ep.name} = {ep.value} ({dist})"))
    found.extend(import_handler(path) for path in import_paths)
    by_name: dict[str, InstalledHandler] = {}
    for item in found:
        other = by_name.get(item.handler.name)
        if other is not None and other.handler is not item.handler:
            raise ConfigError(
                f"two handlers are named {item.handler.name!r}: {other.source} and {item.source}"
            )
        by_name[item.handler.name] = item
    return list(by_name.values())


def installed_process_managers(import_paths: Iterable[str] = ()) -> list[ProcessManager[Any]]:
    """One instance of every installed process type (entry points and `import_paths`)."""
    from rsaga.process.api import ProcessManager

    return [
        item.handler()
        for item in discover_handlers(import_paths)
        if issubclass(item.handler, ProcessManager)
    ]
