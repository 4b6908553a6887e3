"""Snapshots: a fold's state over one stream, stored beside the stream, read first.

A command or process type that sets ``snapshot_every = N`` has the executor
write, in the same atomic commit as its events, the state it folded at the
version the commit checked, once the stream has grown by N events since the
last snapshot. A later fold without a cached state starts from the snapshot and
reads only the events after it.

A snapshot is msgpack of ``(version, fingerprint, encoded state)``. The
fingerprint hashes the fold's name, its `snapshot_version` and the JSON schema
of its state type: a snapshot written by a state type of another shape (or by
a fold whose meaning was bumped) does not match, so it is ignored and the fold
starts from version 1; the next commit writes a new snapshot. A snapshot that
cannot be decoded is ignored the same way: never misread.
"""

from __future__ import annotations

import functools
import hashlib
import typing
from typing import Any

import msgspec

from rsaga.errors import ValidationError


class Snapshot(msgspec.Struct, frozen=True, array_like=True):
    """What a snapshot key holds."""

    version: int
    fingerprint: str
    state: bytes
    keys: list[str]
    """Idempotency keys of the events folded: a step repeated after the snapshot is still
    found a duplicate (the events before the snapshot are not read again)."""


class SnapshotSpec(msgspec.Struct, frozen=True):
    """How a fold is snapshotted: its name, how often, the type its state decodes as."""

    name: str
    """Distinguishes folds of the same stream (part of the key and the fingerprint)."""
    every: int
    state_type: Any
    version: int = 1

    def fingerprint(self) -> str:
        """See `fingerprint`."""
        return fingerprint(self.name, self.state_type, self.version)


def state_type_of(cls: type, base: type) -> Any:
    """The type argument `cls` gives `base` (``class C(Command[X])`` -> X), or Any."""
    for klass in cls.__mro__:
        for parent in getattr(klass, "__orig_bases__", ()):
            origin = typing.get_origin(parent)
            if isinstance(origin, type) and issubclass(origin, base):
                args = typing.get_args(parent)
                if args and not isinstance(args[0], typing.TypeVar):
                    return args[0]
    return Any


@functools.lru_cache(maxsize=256)
def fingerprint(name: str, state_type: Any, version: int) -> str:
    """What a snapshot must carry to be read back as `state_type` by fold `name`."""
    try:
        schema = msgspec.json.encode(msgspec.json.schema(state_type), order="sorted")
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"snapshots of {name}: state type {state_type!r} has no msgspec schema: {exc}"
        ) from None
    digest = hashlib.sha256(b"%s\0%d\0%s" % (name.encode(), version, schema))
    return digest.hexdigest()[:16]


def encode_snapshot(version: int, fingerprint: str, state: Any, keys: set[str]) -> bytes:
    """The bytes of a snapshot of `state` at `version`."""
    try:
        encoded = msgspec.msgpack.encode(state)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"a folded state cannot be snapshotted: {exc}") from None
    return msgspec.msgpack.encode(Snapshot(version, fingerprint, encoded, sorted(keys)))


def decode_snapshot(
    blob: bytes | None, fingerprint: str, state_type: Any
) -> tuple[int, Any, set[str]] | None:
    """(version, state, keys) of a snapshot matching `fingerprint`; None for any other."""
    if blob is None:
        return None
    try:
        snapshot = msgspec.msgpack.decode(blob, type=Snapshot)
        if snapshot.fingerprint != fingerprint or snapshot.version < 1:
            return None
        state = msgspec.msgpack.decode(snapshot.state, type=state_type)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return snapshot.version, state, set(snapshot.keys)
