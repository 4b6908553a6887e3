"""rsaga: long-running business processes on Redis Streams, event sourced.

The public API is what this module exports; everything else is internal.
"""

from importlib.metadata import PackageNotFoundError, version

from rsaga.clock import Clock, ManualClock, SystemClock
from rsaga.commands import Command, StatelessCommand, StreamId, Writes
from rsaga.config import Settings, load_settings
from rsaga.errors import (
    ConcurrencyConflict,
    ConfigError,
    CrossShardWrite,
    DomainError,
    EventDecodeError,
    EventTooLarge,
    InvalidStreamId,
    RedisUnavailable,
    RetriesExhausted,
    RsagaError,
    UndeclaredStream,
    UnknownEventType,
    ValidationError,
)
from rsaga.events import EventRegistry, RecordedEvent
from rsaga.executor import ExecutionResult, Executor
from rsaga.keyspace import Keyspace
from rsaga.retry import ExponentialBackoff, FixedDelay, LinearBackoff, RetryPolicy
from rsaga.store import CommitResult, EventStore, ExpectedVersion, StreamWrite

try:
    __version__ = version("rsaga")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Clock",
    "Command",
    "CommitResult",
    "ConcurrencyConflict",
    "ConfigError",
    "CrossShardWrite",
    "DomainError",
    "EventDecodeError",
    "EventRegistry",
    "EventStore",
    "EventTooLarge",
    "ExecutionResult",
    "Executor",
    "ExpectedVersion",
    "ExponentialBackoff",
    "FixedDelay",
    "InvalidStreamId",
    "Keyspace",
    "LinearBackoff",
    "ManualClock",
    "RecordedEvent",
    "RedisUnavailable",
    "RetriesExhausted",
    "RetryPolicy",
    "RsagaError",
    "Settings",
    "StatelessCommand",
    "StreamId",
    "StreamWrite",
    "SystemClock",
    "UndeclaredStream",
    "UnknownEventType",
    "ValidationError",
    "Writes",
    "__version__",
    "load_settings",
]
