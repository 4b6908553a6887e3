"""Every record rsaga keeps in a Redis stream or key, one msgspec Struct each.

This module is the one place in Python that names their fields; the Lua side
names the same fields in ``lua/includes/record_fields.lua`` (a test compares
the two). Records:

- `LogRecord`: an entry of a shard log (written by ``commit.lua``), one event;
- `DueRecord`: an entry of a shard's due-timeouts stream (``move_due_timeouts.lua``);
- `DeadLetterRecord`: a dead letter (``dead_letter.lua``, and ``commit.lua`` for a
  process that escalates its failure), with the whole record that failed;
- `Heartbeat`: a live worker's or scheduler's heartbeat key (JSON).

A timeout id ("<process stream id>|<timeout name>") is built and split only by
`rsaga.process.timeouts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

# Fields of a shard-log entry (and of a due entry, which shares s and t).
STREAM = b"s"
"""The event's stream id (a due entry: its process's stream id)."""
VERSION = b"v"
"""The event's version in its stream."""
TYPE = b"t"
"""The event type (a due entry: the process type); lets groups skip what they do not want."""
DATA = b"d"
"""The event envelope (msgpack)."""
GROUP = b"g"
"""Only this consumer group handles the entry: a replayed dead letter."""
REPLAY_OF = b"r"
"""The dead-letter id a replayed entry came from."""
# Fields of a due entry.
PAYLOAD = b"p"
"""The timeout payload (`rsaga.process.timeouts.TimeoutPayload`, msgpack)."""
DUE = b"due"
"""When the timeout was due (ms since the epoch)."""

RECORD_FIELDS = (STREAM, VERSION, TYPE, DATA, GROUP, REPLAY_OF, PAYLOAD, DUE)
"""Every field a log or due entry may have; a dead letter copies them all."""


def _text(fields: Mapping[bytes, bytes], name: bytes, default: str = "") -> str:
    value = fields.get(name)
    return default if value is None else value.decode(errors="replace")


class LogRecord(msgspec.Struct, frozen=True):
    """One entry of a shard log: one event, in commit order."""

    stream_id: str
    version: int
    envelope: bytes
    type: str | None = None
    group: str | None = None
    replay_of: str | None = None

    @classmethod
    def decode(cls, fields: Mapping[bytes, bytes]) -> LogRecord:
        """The record of a raw entry; `KeyError`, `ValueError` or `UnicodeDecodeError`
        if it lacks a valid stream id, version or envelope."""
        kind = fields.get(TYPE)
        group = fields.get(GROUP)
        replay_of = fields.get(REPLAY_OF)
        return cls(
            fields[STREAM].decode(),
            int(fields[VERSION]),
            fields[DATA],
            None if kind is None else kind.decode(errors="replace"),
            None if group is None else group.decode(errors="replace"),
            None if replay_of is None else replay_of.decode(errors="replace"),
        )


class DueRecord(msgspec.Struct, frozen=True):
    """One entry of a shard's due-timeouts stream: a timeout that fell due."""

    stream_id: str
    payload: bytes
    due_ms: int
    process_type: str | None = None
    """None when the payload was unreadable to the scheduler: every group gets it."""

    @classmethod
    def decode(cls, fields: Mapping[bytes, bytes]) -> DueRecord:
        """The record of a raw due entry; `KeyError` if it has no payload."""
        kind = fields.get(TYPE)
        return cls(
            _text(fields, STREAM),
            fields[PAYLOAD],
            int(_text(fields, DUE, "0") or 0),
            None if kind is None else kind.decode(errors="replace"),
        )


def record_of(fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """The record fields of a raw log or due entry (see `RECORD_FIELDS`), all of them."""
    return {name: fields[name] for name in RECORD_FIELDS if name in fields}


def payload_of(fields: Mapping[bytes, bytes]) -> bytes:
    """The timeout payload of a raw due entry (`KeyError` if none): the hot path of
    `DueRecord.decode`."""
    return fields[PAYLOAD]


def stream_of(fields: Mapping[bytes, bytes]) -> bytes:
    """The stream id of a raw log or due entry exactly as stored, or b''."""
    return fields.get(STREAM, b"")


def is_due_record(fields: Mapping[bytes, bytes]) -> bool:
    """Whether a raw entry (or a dead letter's copy of one) is a due timeout."""
    return PAYLOAD in fields


class DeadLetterRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A dead letter: why an entry failed, with the whole entry (`record`), whatever its
    kind, so that a replay puts back exactly what failed."""

    handler: str
    """The consumer group (handler or process type) that gave up on it."""
    error_type: str
    error: str
    failed_at_ms: int
    log_id: str = ""
    traceback: str = ""
    attempts: int = 0
    deliveries: int = 0
    consumer: str = ""
    process_id: str = ""
    """A process that escalated its own failure: its id (`record` holds its stream id)."""
    record: dict[bytes, bytes] = msgspec.field(default_factory=dict)
    """The failed entry's fields (see `RECORD_FIELDS`)."""

    def encode(self) -> dict[str, bytes | str | int | float]:
        """The dead letter's stream fields."""
        fields: dict[str, bytes | str | int | float] = {
            "handler": self.handler,
            "log_id": self.log_id,
            "error_type": self.error_type,
            "error": self.error,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "deliveries": self.deliveries,
            "failed_at_ms": self.failed_at_ms,
            "consumer": self.consumer,
        }
        if self.process_id:
            fields["process_id"] = self.process_id
        for name, value in self.record.items():
            fields[name.decode()] = value
        return fields

    @classmethod
    def decode(cls, fields: Mapping[bytes, bytes]) -> DeadLetterRecord:
        """A dead letter from its stream fields (missing or unreadable ones default)."""

        def number(name: bytes) -> int:
            text = _text(fields, name, "0")
            return int(text) if text.isdigit() else 0

        return cls(
            handler=_text(fields, b"handler"),
            error_type=_text(fields, b"error_type"),
            error=_text(fields, b"error"),
            failed_at_ms=number(b"failed_at_ms"),
            log_id=_text(fields, b"log_id"),
            traceback=_text(fields, b"traceback"),
            attempts=number(b"attempts"),
            deliveries=number(b"deliveries"),
            consumer=_text(fields, b"consumer"),
            process_id=_text(fields, b"process_id"),
            record={name: fields[name] for name in RECORD_FIELDS if name in fields},
        )

    @property
    def stream_id(self) -> str:
        """The failed entry's stream id ('' if none)."""
        return _text(self.record, STREAM)

    @property
    def version(self) -> int | None:
        """The failed event's version (None for a timeout or an escalated failure)."""
        version = self.record.get(VERSION)
        return int(version) if version and version.isdigit() else None

    @property
    def payload(self) -> bytes | None:
        """The failed timeout's payload (None for an event)."""
        return self.record.get(PAYLOAD)


class Heartbeat(msgspec.Struct, frozen=True):
    """What a live worker or scheduler tells about itself in Redis."""

    consumer: str
    host: str
    pid: int
    handlers: list[str]
    started_at: float
    kind: str = "worker"

    def encode(self) -> bytes:
        """The heartbeat key's value."""
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, blob: Any) -> Heartbeat:
        """A heartbeat from its key's value (`msgspec.DecodeError` if unreadable)."""
        return msgspec.json.decode(blob, type=cls)
