"""The store an application needs, built from the settings its workers use.

Workers, schedulers and app code must agree on the Redis server, the key
prefix, the number of shards and the limits, and app code reading a process's
stream needs every event type the process writes, rsaga's own included.
`open_store` builds that store from one `Settings`, so none of it is repeated
by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rsaga.config import Settings, load_settings
from rsaga.connection import connect, embedded
from rsaga.events import EventRegistry
from rsaga.handlers import discover_handlers
from rsaga.keyspace import Keyspace
from rsaga.process.api import ProcessManager
from rsaga.process.events import FRAMEWORK_EVENTS
from rsaga.process.saga import SAGA_EVENTS
from rsaga.store import EventStore


def framework_registry(events: Iterable[Any] = ()) -> EventRegistry:
    """A registry of rsaga's own process and saga events, plus `events`."""
    return EventRegistry([*FRAMEWORK_EVENTS, *SAGA_EVENTS, *events])


def _register_installed(registry: EventRegistry, import_paths: Iterable[str] = ()) -> None:
    """Register the events of every installed handler and process type (entry points
    and `import_paths`): what they handle, what they read, and a process's own events."""
    for item in discover_handlers(import_paths):
        handler: Any = item.handler
        if issubclass(handler, ProcessManager):
            handler.validate()
            registry.register(*handler.state_events)
        registry.register(*handler.events, *handler.decodes)


def open_store(
    settings: Settings | None = None,
    *,
    events: Iterable[Any] = (),
    installed: bool = True,
    allow_embedded: bool = False,
) -> EventStore:
    """An `EventStore` on the configured Redis, prefix, shards and limits.

    `settings` defaults to `load_settings()` (``config/rsaga.toml`` and ``RSAGA_*``
    variables), the same ones ``rsaga worker`` reads. The store's registry knows
    rsaga's framework events, `events` (the app's own types, or unions of them)
    and, with `installed`, the events of every installed handler and process type
    (``rsaga.handlers`` entry points and ``worker.handlers``), so any process
    stream reads back without `UnknownEventType`.

    With no ``redis.url`` this is a `ConfigError`, unless `allow_embedded`: then the
    store runs on an in-process fakeredis (tests, demos; needs ``rsaga[embedded]``).
    Nothing connects until the first call; close it with ``await store.redis.aclose()``.
    """
    settings = settings if settings is not None else load_settings()
    registry = framework_registry(events)
    if installed:
        _register_installed(registry, settings.worker.handlers)
    redis = embedded() if allow_embedded and not settings.redis.url else connect(settings.redis)
    return EventStore(
        redis,
        registry,
        keyspace=Keyspace(prefix=settings.store.prefix, shards=settings.store.shards),
        max_event_bytes=settings.store.max_event_bytes,
        page_size=settings.store.read_page_size,
        durability=settings.store.durability,
        replicas=settings.store.replicas,
        replication_timeout=settings.store.replication_timeout,
        dead_letter_max_len=settings.worker.dead_letter_max_len,
    )
