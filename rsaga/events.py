"""Events: user types, the registry that names them, and the stored envelope codec.

Users declare events as `msgspec.Struct` types, often a tagged union per event
family. An event's type name is its msgspec tag when it has one, else its class
name; the name is what is stored, so it must stay stable.

A stored event is one msgpack array, the *envelope*:
``[event_id(16 bytes), type, occurred_at_ms, correlation_id, causation_id, payload,
command_id, metadata]`` where ``payload`` is the msgpack encoding of the user's struct,
``command_id`` (optional) is the idempotency key of the command that wrote it and
``metadata`` (optional, absent from older envelopes and left out when empty) a map
of strings such as the W3C trace context. Stream id and
version are not in the envelope: they come from the key and the entry id.
"""

from __future__ import annotations

import os
import time
import types
import typing
from collections.abc import Container, Iterable
from datetime import UTC, datetime
from typing import Any, Generic

import msgspec
from typing_extensions import TypeVar

from rsaga.errors import EventDecodeError, EventTooLarge, UnknownEventType, ValidationError

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024

MAX_EVENT_NESTING = 64
"""How deep containers may nest inside one event; deeper events are refused when
appended, since decoding them later could exhaust the reader's stack."""

_CONTAINERS = (msgspec.Struct, list, tuple, dict, set, frozenset)


def nesting_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers (structs, lists, dicts, sets) nest more than `limit` deep in `value`."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, msgspec.Struct):
            children: Iterable[Any] = msgspec.structs.astuple(item)
        elif isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        else:
            children = item
        stack.extend((child, depth + 1) for child in children if isinstance(child, _CONTAINERS))
    return False


def new_id() -> str:
    """A fresh 128-bit id as 32 hex digits, time-ordered by its first 48 bits (ms)."""
    return (time.time_ns() // 1_000_000).to_bytes(6, "big").hex() + os.urandom(10).hex()


EventData = TypeVar("EventData", default=Any)
"""The type of a `RecordedEvent`'s data; `Any` when not given."""


class RecordedEvent(msgspec.Struct, Generic[EventData], frozen=True):
    """An event as stored: where it is, when and why it happened, and its data.

    ``RecordedEvent[Deposited]`` types `data` as ``Deposited`` for mypy; a bare
    ``RecordedEvent`` has ``data: Any``.
    """

    stream_id: str
    """The stream the event belongs to."""
    version: int
    """1-based position of the event in its stream."""
    event_id: str
    """Globally unique id (32 hex digits)."""
    occurred_at: datetime
    """When the event was recorded (UTC, millisecond precision)."""
    type: str
    """The event type name, as registered."""
    data: EventData
    """The user's event struct."""
    correlation_id: str
    """Id shared by everything one business request caused."""
    causation_id: str | None
    """Id of the event or command that directly caused this one."""
    command_id: str | None = None
    """Idempotency key of the command execution that wrote the event, if it had one."""
    metadata: dict[str, str] | None = None
    """String pairs the writer carried along (e.g. the W3C trace context), if any."""


class _PlainEnvelope(msgspec.Struct, array_like=True, frozen=True):
    """An envelope without metadata: written as envelopes were before metadata existed."""

    event_id: bytes
    type: str
    occurred_at_ms: int
    correlation_id: str
    causation_id: str | None
    payload: msgspec.Raw
    command_id: str | None = None


class _Envelope(_PlainEnvelope, array_like=True, frozen=True):
    """Decodes both; written when there is metadata."""

    metadata: dict[str, str] | None = None


def _type_name(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    return cls.__name__ if tag is None else str(tag)


class EventRegistry:
    """Maps event type names to `msgspec.Struct` types, both ways."""

    def __init__(self, types: Iterable[Any] = ()) -> None:
        self._by_name: dict[str, type[msgspec.Struct]] = {}
        self._by_type: dict[type[msgspec.Struct], str] = {}
        self._decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {}
        self.register(*types)

    def register(self, *types_: Any) -> None:
        """Register struct types; a `Union` of structs registers each member."""
        for cls in types_:
            if typing.get_origin(cls) in (typing.Union, types.UnionType):
                self.register(*typing.get_args(cls))
                continue
            if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
                raise ValidationError(f"event types must be msgspec.Struct classes, got {cls!r}")
            name = _type_name(cls)
            known = self._by_name.get(name)
            if known is cls:
                continue
            if known is not None:
                raise ValidationError(
                    f"event type name {name!r} is taken by {known.__module__}.{known.__qualname__}"
                )
            self._by_name[name] = cls
            self._by_type[cls] = name
            self._decoders[name] = msgspec.msgpack.Decoder(cls)

    def __contains__(self, item: object) -> bool:
        return item in self._by_name or item in self._by_type

    def names(self) -> list[str]:
        """Every registered type name, sorted."""
        return sorted(self._by_name)

    def name_of(self, event: msgspec.Struct) -> str:
        """The registered name of `event`'s type; `UnknownEventType` if unregistered."""
        try:
            return self._by_type[type(event)]
        except KeyError:
            raise UnknownEventType(
                f"event type {type(event).__qualname__} is not registered; "
                "register it with EventRegistry.register()"
            ) from None

    def name_of_type(self, cls: type[msgspec.Struct]) -> str:
        """The registered name of the type `cls`; `UnknownEventType` if unregistered."""
        try:
            return self._by_type[cls]
        except KeyError:
            raise UnknownEventType(f"event type {cls.__qualname__} is not registered") from None

    def type_of(self, name: str) -> type[msgspec.Struct]:
        """The struct type registered as `name`; `UnknownEventType` if none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownEventType(f"event type {name!r} is not registered") from None

    def decoder(self, name: str) -> msgspec.msgpack.Decoder[Any]:
        """The msgpack decoder for the type registered as `name`."""
        try:
            return self._decoders[name]
        except KeyError:
            raise UnknownEventType(f"event type {name!r} is not registered") from None


class EventCodec:
    """Encodes new events into envelopes and decodes stored envelopes into `RecordedEvent`."""

    def __init__(
        self, registry: EventRegistry, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    ) -> None:
        self.registry = registry
        self.max_event_bytes = max_event_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._envelope_decoder = msgspec.msgpack.Decoder(_Envelope)

    def encode(
        self,
        event: msgspec.Struct,
        *,
        event_id: str,
        occurred_at_ms: int,
        correlation_id: str,
        causation_id: str | None,
        command_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> bytes:
        """Envelope bytes for a new event; raises before anything is written if invalid."""
        name = self.registry.name_of(event)
        if nesting_depth_exceeds(event, MAX_EVENT_NESTING):
            raise ValidationError(
                f"event {name} nests containers more than {MAX_EVENT_NESTING} deep"
            )
        payload = self._encoder.encode(event)
        parts = (
            bytes.fromhex(event_id), name, occurred_at_ms, correlation_id, causation_id,
            msgspec.Raw(payload), command_id,
        )
        envelope = _Envelope(*parts, metadata) if metadata else _PlainEnvelope(*parts)
        blob = self._encoder.encode(envelope)
        if len(blob) > self.max_event_bytes:
            raise EventTooLarge(
                f"event {name} encodes to {len(blob)} bytes; the limit is {self.max_event_bytes}"
            )
        return blob

    def decode(self, stream_id: str, version: int, blob: bytes) -> RecordedEvent:
        """Decode stored envelope bytes; `EventDecodeError` or `UnknownEventType` if bad."""
        event = self.decode_wanted(stream_id, version, blob, None)
        assert event is not None
        return event

    def decode_wanted(
        self,
        stream_id: str,
        version: int,
        blob: bytes,
        wanted: Container[str] | None,
        logged_type: bytes | None = None,
    ) -> RecordedEvent | None:
        """Like `decode`, but None without decoding the payload if the type is not wanted.

        `logged_type` is the type the log entry names beside the envelope (its
        ``t`` field), if any; an envelope of another type is corrupt.
        """
        where = f"{stream_id}@{version}"
        try:
            env = self._envelope_decoder.decode(blob)
        except (msgspec.DecodeError, TypeError, ValueError, RecursionError) as exc:
            raise EventDecodeError(f"{where}: envelope is not valid: {exc!r}") from None
        if logged_type is not None and logged_type != env.type.encode():
            raise EventDecodeError(
                f"{where}: the log names type {logged_type.decode(errors='replace')!r} "
                f"but the envelope holds {env.type!r}"
            )
        if wanted is not None and env.type not in wanted:
            return None
        try:
            decoder = self.registry.decoder(env.type)
        except UnknownEventType:
            raise UnknownEventType(f"{where}: event type {env.type!r} is not registered") from None
        try:
            data = decoder.decode(env.payload)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise EventDecodeError(f"{where}: {env.type} payload is not valid: {exc!r}") from None
        try:
            occurred_at = datetime.fromtimestamp(env.occurred_at_ms / 1000, UTC)
        except (ValueError, OverflowError, OSError):
            raise EventDecodeError(
                f"{where}: occurred_at_ms {env.occurred_at_ms} is out of range"
            ) from None
        try:
            event_id = env.event_id.hex()
        except ValueError:
            raise EventDecodeError(f"{where}: event id is not valid") from None
        return RecordedEvent(
            stream_id=stream_id,
            version=version,
            event_id=event_id,
            occurred_at=occurred_at,
            type=env.type,
            data=data,
            correlation_id=env.correlation_id,
            causation_id=env.causation_id,
            command_id=env.command_id,
            metadata=env.metadata,
        )
