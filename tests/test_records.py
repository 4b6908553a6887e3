"""Redis records: one owner in Python (rsaga.records), the same field names in Lua, dead
letters that copy a whole record, and a commit's dead letters trimmed as configured."""

from __future__ import annotations

import re
from importlib import resources

import msgspec
import pytest
from redis.asyncio import Redis

from rsaga import EventRegistry, EventStore, Keyspace, StreamWrite, ValidationError
from rsaga.records import (
    DATA,
    DUE,
    GROUP,
    PAYLOAD,
    RECORD_FIELDS,
    REPLAY_OF,
    STREAM,
    TYPE,
    VERSION,
    DeadLetterRecord,
    DueRecord,
    Heartbeat,
    LogRecord,
    record_of,
)
from rsaga.scripts import CommitStream, Scripts, SideEffect
from rsaga.store import Effects


class Noted(msgspec.Struct, frozen=True, tag="test.Noted"):
    text: str


def test_lua_names_the_same_fields_as_python() -> None:
    source = resources.files("rsaga").joinpath("lua/includes/record_fields.lua").read_text()
    lua = dict(re.findall(r"(\w+) = '([^']*)'", source))
    python = {
        "stream": STREAM, "version": VERSION, "type": TYPE, "data": DATA, "group": GROUP,
        "replay_of": REPLAY_OF, "payload": PAYLOAD, "due": DUE,
    }
    assert {k: v.encode() for k, v in lua.items()} == python
    assert set(python.values()) == set(RECORD_FIELDS)


def test_no_lua_script_spells_a_record_field_itself() -> None:
    lua = resources.files("rsaga").joinpath("lua")
    for entry in [*lua.iterdir(), *lua.joinpath("includes").iterdir()]:
        if entry.name.endswith(".lua") and entry.name != "record_fields.lua":
            text = entry.read_text()
            for name in ("s", "v", "t", "d", "g", "r", "p", "due"):
                assert f"entry_field(fields, '{name}')" not in text, entry.name
                assert f"'XADD', log, '*', '{name}'" not in text, entry.name


def test_a_log_record_and_a_due_record_decode() -> None:
    log = LogRecord.decode({STREAM: b"order-1", VERSION: b"3", DATA: b"env", TYPE: b"T"})
    assert log == LogRecord("order-1", 3, b"env", "T")
    due = DueRecord.decode({STREAM: b"p-1", PAYLOAD: b"\x01", DUE: b"17", TYPE: b"p"})
    assert due == DueRecord("p-1", b"\x01", 17, "p")


def test_a_dead_letter_copies_the_whole_record_whatever_its_kind() -> None:
    due = {STREAM: b"p-1", PAYLOAD: b"\x01", DUE: b"17", TYPE: b"p", b"other": b"x"}
    letter = DeadLetterRecord(
        handler="rsaga-timeouts:p", error_type="E", error="boom", failed_at_ms=5,
        record=record_of(due),
    )
    assert letter.record == {STREAM: b"p-1", PAYLOAD: b"\x01", DUE: b"17", TYPE: b"p"}
    fields = {k.encode(): v if isinstance(v, bytes) else str(v).encode()
              for k, v in letter.encode().items()}
    back = DeadLetterRecord.decode(fields)
    assert back == letter
    assert (back.payload, back.stream_id, back.version) == (b"\x01", "p-1", None)


def test_a_heartbeat_round_trips() -> None:
    beat = Heartbeat("c", "h", 1, ["a"], 2.5, "scheduler")
    assert Heartbeat.decode(beat.encode()) == beat


async def test_a_commits_dead_letters_are_trimmed_as_configured(
    redis: Redis, prefix: str
) -> None:
    keyspace = Keyspace(prefix=prefix)
    store = EventStore(redis, EventRegistry([Noted]), keyspace=keyspace, dead_letter_max_len=1)
    letter = DeadLetterRecord(handler="h", error_type="E", error="e", failed_at_ms=1).encode()
    for n in range(300):
        await store.commit(
            [StreamWrite(f"note-{n}", -1, [Noted("x")])],
            effects=Effects(dead_letters=[letter]),
        )
    # MAXLEN ~ trims whole nodes (100 entries by default): far fewer than 300 stay.
    assert await redis.xlen(keyspace.dead_letters(0)) <= 200


async def test_the_facade_refuses_a_side_effect_commit_lua_does_not_know(
    redis: Redis, prefix: str
) -> None:
    scripts = Scripts(redis, Keyspace(prefix=prefix))
    with pytest.raises(ValidationError, match="no side effect 'nope'"):
        await scripts.commit(
            0, [CommitStream("a-1", -1, [])], side_effects=[SideEffect("nope", [], [])],
            with_effects=True,
        )
