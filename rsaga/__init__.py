"""rsaga: long-running business processes on Redis Streams, event sourced.

The public API is what this module exports; everything else is internal.
"""

from importlib.metadata import PackageNotFoundError, version

from rsaga.app import open_store
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
    StreamRemoved,
    UndeclaredStream,
    UnknownEventType,
    ValidationError,
)
from rsaga.events import EventRegistry, RecordedEvent
from rsaga.executor import ExecutionResult, Executor
from rsaga.handlers import EventHandler, HandlerContext
from rsaga.interceptors import (
    CommandInput,
    HandleInput,
    Interceptor,
    Interceptors,
    StepInput,
    TimeoutInput,
)
from rsaga.keyspace import Keyspace
from rsaga.observe import Observer
from rsaga.process.api import (
    AdvanceTrigger,
    Decision,
    EventTrigger,
    ProcessInfo,
    ProcessManager,
    RejectedTrigger,
    StartTrigger,
    Timeout,
    TimeoutTrigger,
    Trigger,
)
from rsaga.process.runner import ProcessRunner
from rsaga.process.saga import Saga, Step
from rsaga.retry import (
    BuiltinRetryPolicy,
    ExponentialBackoff,
    FixedDelay,
    LinearBackoff,
    RetryPolicy,
)
from rsaga.runtime.scheduler import Scheduler
from rsaga.runtime.worker import Worker
from rsaga.store import CommitResult, EventStore, ExpectedVersion, StreamWrite

try:
    __version__ = version("rsaga")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AdvanceTrigger",
    "BuiltinRetryPolicy",
    "Clock",
    "Command",
    "CommandInput",
    "CommitResult",
    "ConcurrencyConflict",
    "ConfigError",
    "CrossShardWrite",
    "Decision",
    "DomainError",
    "EventDecodeError",
    "EventHandler",
    "EventRegistry",
    "EventStore",
    "EventTooLarge",
    "EventTrigger",
    "ExecutionResult",
    "Executor",
    "ExpectedVersion",
    "ExponentialBackoff",
    "FixedDelay",
    "HandleInput",
    "HandlerContext",
    "Interceptor",
    "Interceptors",
    "InvalidStreamId",
    "Keyspace",
    "LinearBackoff",
    "ManualClock",
    "Observer",
    "ProcessInfo",
    "ProcessManager",
    "ProcessRunner",
    "RecordedEvent",
    "RedisUnavailable",
    "RejectedTrigger",
    "RetriesExhausted",
    "RetryPolicy",
    "RsagaError",
    "Saga",
    "Scheduler",
    "Settings",
    "StartTrigger",
    "StatelessCommand",
    "Step",
    "StepInput",
    "StreamId",
    "StreamRemoved",
    "StreamWrite",
    "SystemClock",
    "Timeout",
    "TimeoutInput",
    "TimeoutTrigger",
    "Trigger",
    "UndeclaredStream",
    "UnknownEventType",
    "ValidationError",
    "Worker",
    "Writes",
    "__version__",
    "load_settings",
    "open_store",
]
