"""One error root and a short tree under it: every error rsaga raises is an `RsagaError`."""

from __future__ import annotations


class RsagaError(Exception):
    """Root of every error rsaga raises."""


class ValidationError(RsagaError, ValueError):
    """Input to a public entry point was refused before anything was written."""


class InvalidStreamId(ValidationError):
    """A stream id is empty, too long, or has characters the keyspace cannot carry."""


class UndeclaredStream(ValidationError):
    """A command tried to write to a stream it did not declare (or resolve) as read."""


class EventTooLarge(ValidationError):
    """An encoded event is over the configured size limit."""


class CrossShardWrite(ValidationError):
    """One atomic write touched streams that live in different shards."""


class UnknownEventType(RsagaError):
    """An event type name, or a Python event class, is not in the event registry."""


class EventDecodeError(RsagaError):
    """Stored bytes could not be decoded into an event (corrupt or wrong shape)."""


class ConcurrencyConflict(RsagaError):
    """A stream's version was not the expected one; nothing was written."""

    def __init__(self, stream_id: str, expected: str, actual: int) -> None:
        super().__init__(
            f"version conflict on stream {stream_id!r}: expected {expected}, actual {actual}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class StreamRemoved(RsagaError):
    """A write to the stream of a process removed after its retention (only its tombstone
    is left); nothing was written."""


class RetriesExhausted(RsagaError):
    """A command kept conflicting after every retry its policy allows."""

    def __init__(self, attempts: int, last: ConcurrencyConflict) -> None:
        super().__init__(f"gave up after {attempts} attempts; last conflict: {last}")
        self.attempts = attempts
        self.last = last


class DomainError(RsagaError):
    """Raised by a command's `handle` to refuse the command; never retried."""


class ConfigError(RsagaError):
    """The configuration (file or environment) is invalid; the message names the key."""


class RedisUnavailable(RsagaError, ConnectionError):
    """Redis could not be reached; the message names the address, never the password."""


class NotReplicated(RedisUnavailable):
    """A commit reached its master but not enough replicas acknowledged it in time
    (``store.durability = "replicated"``): a failover now could lose it. Retrying the
    command is safe (expected versions and idempotency keys)."""


class ScriptError(RsagaError):
    """A Lua script returned an error code rsaga does not know, naming the script."""
