"""Event registry and envelope codec (pure, no Redis)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import msgspec
import pytest
from bank import BANK_EVENTS, AccountEvent, Deposited, Note, Opened, Withdrawn

from rsaga import (
    EventDecodeError,
    EventRegistry,
    EventTooLarge,
    RecordedEvent,
    UnknownEventType,
    ValidationError,
)
from rsaga.events import DEFAULT_MAX_EVENT_BYTES, EventCodec, new_id

CORRELATION = "c" * 32
T0 = 1_700_000_000_123


def envelope(*fields: object) -> bytes:
    """Envelope bytes built by hand: [event_id, type, occurred_at_ms, corr, cause, payload]."""
    return msgspec.msgpack.encode(list(fields))


def encode(codec: EventCodec, event: msgspec.Struct, **overrides: object) -> bytes:
    args: dict[str, object] = {
        "event_id": "ab" * 16,
        "occurred_at_ms": T0,
        "correlation_id": CORRELATION,
        "causation_id": None,
    }
    args.update(overrides)
    return codec.encode(event, **args)  # type: ignore[arg-type]


# --- registry -----------------------------------------------------------------------


def test_type_names_are_tags_or_class_names() -> None:
    registry = EventRegistry([*BANK_EVENTS, Note])
    assert registry.names() == ["Note", "bank.deposited", "bank.opened", "bank.withdrawn"]
    assert registry.name_of(Deposited(5)) == "bank.deposited"
    assert registry.name_of(Note("hi")) == "Note"
    assert registry.type_of("bank.opened") is Opened
    assert "bank.withdrawn" in registry
    assert Withdrawn in registry
    assert "Withdrawn" not in registry


def test_a_union_registers_every_member() -> None:
    registry = EventRegistry([AccountEvent])
    assert registry.names() == ["bank.deposited", "bank.opened", "bank.withdrawn"]


def test_registering_the_same_type_twice_is_harmless() -> None:
    registry = EventRegistry([Deposited])
    registry.register(Deposited, AccountEvent)
    assert registry.names() == ["bank.deposited", "bank.opened", "bank.withdrawn"]


def test_two_types_with_one_name_are_refused() -> None:
    class Impostor(msgspec.Struct, frozen=True, tag="bank.deposited"):
        amount: int

    registry = EventRegistry([Deposited])
    with pytest.raises(ValidationError, match=r"'bank.deposited' is taken by .*Deposited"):
        registry.register(Impostor)
    assert registry.type_of("bank.deposited") is Deposited


@pytest.mark.parametrize("thing", [int, "bank.opened", Deposited(1), dict])
def test_only_struct_types_register(thing: object) -> None:
    with pytest.raises(ValidationError, match=r"msgspec\.Struct"):
        EventRegistry([thing])


def test_unknown_names_and_types_raise_unknown_event_type() -> None:
    registry = EventRegistry(BANK_EVENTS)
    with pytest.raises(UnknownEventType, match="Note is not registered"):
        registry.name_of(Note("x"))
    with pytest.raises(UnknownEventType, match="'Note'"):
        registry.type_of("Note")
    with pytest.raises(UnknownEventType, match="'Note'"):
        registry.decoder("Note")


# --- codec --------------------------------------------------------------------------


def test_round_trip_keeps_every_field() -> None:
    codec = EventCodec(EventRegistry(BANK_EVENTS))
    event_id = new_id()
    blob = encode(codec, Opened("ann", fee_account="fees"), event_id=event_id, causation_id="x1")
    recorded = codec.decode("acct-1", 7, blob)
    assert recorded == RecordedEvent(
        stream_id="acct-1",
        version=7,
        event_id=event_id,
        occurred_at=datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
        type="bank.opened",
        data=Opened("ann", fee_account="fees"),
        correlation_id=CORRELATION,
        causation_id="x1",
    )


def test_envelope_layout_is_the_documented_array() -> None:
    codec = EventCodec(EventRegistry(BANK_EVENTS))
    blob = encode(codec, Deposited(12), causation_id="cause")
    raw = msgspec.msgpack.decode(blob)
    assert raw[:5] == [bytes.fromhex("ab" * 16), "bank.deposited", T0, CORRELATION, "cause"]
    # The payload is the plain msgpack encoding of the user's struct (tag included).
    assert raw[5] == {"type": "bank.deposited", "amount": 12}


def test_size_limit_is_inclusive_and_configurable() -> None:
    registry = EventRegistry([Note])
    size = len(encode(EventCodec(registry), Note("x" * 100)))
    assert size > 100
    at_limit = EventCodec(registry, max_event_bytes=size)
    assert len(encode(at_limit, Note("x" * 100))) == size
    message = rf"Note encodes to {size} bytes; the limit is {size - 1}"
    with pytest.raises(EventTooLarge, match=message):
        encode(EventCodec(registry, max_event_bytes=size - 1), Note("x" * 100))


def test_default_size_limit_is_one_mebibyte() -> None:
    codec = EventCodec(EventRegistry([Note]))
    assert codec.max_event_bytes == DEFAULT_MAX_EVENT_BYTES == 1024 * 1024
    encode(codec, Note("x" * (1024 * 1024 - 200)))
    with pytest.raises(EventTooLarge):
        encode(codec, Note("x" * (1024 * 1024)))


def test_encoding_an_unregistered_type_fails() -> None:
    with pytest.raises(UnknownEventType):
        encode(EventCodec(EventRegistry(BANK_EVENTS)), Note("x"))


def test_decoding_an_unregistered_type_name_fails_with_its_position() -> None:
    writer = EventCodec(EventRegistry([*BANK_EVENTS, Note]))
    reader = EventCodec(EventRegistry(BANK_EVENTS))
    blob = encode(writer, Note("hello"))
    with pytest.raises(UnknownEventType, match=r"acct-9@3: event type 'Note' is not registered"):
        reader.decode("acct-9", 3, blob)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"garbage bytes",
        msgspec.msgpack.encode({"type": "bank.deposited"}),
        envelope(b"\x00" * 16, "bank.deposited", T0, "c"),  # too short
        envelope("not-bytes", "bank.deposited", T0, "c", None, {"amount": 1}),
        envelope(b"\x00" * 16, 5, T0, "c", None, {"amount": 1}),
    ],
)
def test_garbage_envelopes_raise_event_decode_error(blob: bytes) -> None:
    codec = EventCodec(EventRegistry(BANK_EVENTS))
    with pytest.raises(EventDecodeError, match="s@1: envelope is not valid"):
        codec.decode("s", 1, blob)


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "bank.deposited", "amount": "ten"},
        {"type": "bank.deposited"},
        {"type": "bank.withdrawn", "amount": 1},  # tag of another type
        [1, 2, 3],
    ],
)
def test_a_payload_of_the_wrong_shape_raises_event_decode_error(payload: object) -> None:
    codec = EventCodec(EventRegistry(BANK_EVENTS))
    blob = envelope(b"\x00" * 16, "bank.deposited", T0, "c", None, payload)
    with pytest.raises(EventDecodeError, match=r"s@2: bank\.deposited payload is not valid"):
        codec.decode("s", 2, blob)


def test_new_ids_are_unique_time_ordered_hex() -> None:
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    stamp = int(ids[0][:12], 16)
    assert abs(stamp - time.time_ns() // 1_000_000) < 60_000
    earlier = new_id()
    time.sleep(0.002)
    assert new_id()[:12] > earlier[:12]
