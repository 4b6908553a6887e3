"""Commands: declare the streams they read, fold them into state, decide what to write.

A command is a `msgspec.Struct`, so it can be stored and run by any worker.
Fields typed `StreamId` (or a list or tuple of them) are the streams it reads, as
EventCore's ``#[stream]`` fields are; `handle` may write only to those streams,
or to streams that `more_streams` asked for after seeing the state.
"""

from __future__ import annotations

import typing
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Generic, NewType, Protocol, TypeVar, runtime_checkable

import msgspec

from rsaga.events import RecordedEvent
from rsaga.snapshots import SnapshotSpec, state_type_of
from rsaga.store import Effects

StreamId = NewType("StreamId", str)
"""Type a command field with this to declare it as a stream the command reads."""

S = TypeVar("S")

Writes = Mapping[str, Sequence[msgspec.Struct]]
"""What `Command.handle` returns: new events per stream id."""


class WritePlan(msgspec.Struct, frozen=True):
    """What `handle` may return instead of `Writes`: events plus effects in the same commit
    (timeouts, process-index transitions). Process managers use this."""

    writes: Writes
    effects: Effects


def _stream_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """(field name, is a collection) for each field typed with `StreamId`."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in msgspec.structs.fields(cls):
        hint = hints.get(field.name)
        args = typing.get_args(hint)
        if hint is StreamId or (typing.get_origin(hint) is typing.Union and StreamId in args):
            found.append((field.name, False))
        elif typing.get_origin(hint) in (list, tuple, Sequence) and args and args[0] is StreamId:
            found.append((field.name, True))
    return tuple(found)


@runtime_checkable
class Executable(Protocol[S]):
    """What the executor runs: a `Command`, or rsaga's own process step.

    It names the streams it reads, folds their events into a state, and decides; the
    rest says how the executor may cache and snapshot that state (see `Command`).
    """

    cache_state: ClassVar[bool]
    fold_per_stream: ClassVar[bool]

    def read_streams(self) -> list[str]:
        """The streams to read first."""
        ...

    def metric_label(self) -> str:
        """Its label in metrics."""
        ...

    def initial_state(self) -> S:
        """The state before any event."""
        ...

    def apply(self, state: S, event: RecordedEvent) -> S:
        """Fold one event into the state."""
        ...

    def more_streams(self, state: S) -> Iterable[str]:
        """Streams to read as well, decided after seeing the state."""
        ...

    def handle(self, state: S) -> Writes | WritePlan:
        """Decide what to write."""
        ...

    def fold_key(self) -> Hashable:
        """What identifies its fold in the executor's state cache."""
        ...

    def resume(self, state: S) -> S:
        """A copy of a cached state, adjusted before `handle`."""
        ...

    def merge(self, states: Mapping[str, S]) -> S:
        """With `fold_per_stream`: one state from each stream's."""
        ...

    def snapshot_spec(self) -> SnapshotSpec | None:
        """How its fold is snapshotted, or None."""
        ...

    def to_snapshot(self, state: S) -> Any:
        """What a snapshot stores of `state`."""
        ...

    def from_snapshot(self, data: Any) -> S:
        """The state a snapshot's decoded `data` stands for."""
        ...


class Command(msgspec.Struct, Generic[S], frozen=True, kw_only=True, tag=True):
    """Base class of commands over state `S`.

    Subclasses define `initial_state`, `apply` and `handle`; they may override
    `read_streams` (instead of `StreamId` fields) and `more_streams`.
    """

    _stream_field_cache: ClassVar[dict[type, tuple[tuple[str, bool], ...]]] = {}
    emits: ClassVar[tuple[type[msgspec.Struct], ...]] = ()
    """Event types `handle` may write. A process that issues the command registers them,
    so a worker can execute it whatever handlers it runs."""
    cache_state: ClassVar[bool] = True
    """Whether an executor may keep the folded state for the next command of the same
    `fold_key` and fold only newer events onto it. Caching assumes the fold depends on
    the command's type (not its field values: see `fold_key`) and not on how events of
    *different* streams interleave (each stream's events still apply in order)."""
    fold_per_stream: ClassVar[bool] = False
    """Fold each stream alone from `initial_state` and give `handle` their `merge`: each
    stream's state is then cached and snapshotted on its own, so commands over any
    combination of streams share them (a transfer between two of many accounts)."""
    snapshot_every: ClassVar[int] = 0
    """For a command that reads one stream (or folds per stream): store a snapshot of the
    folded state, in the same commit, each time the stream has grown this many events
    (0: never), so a fold starts from it (see `rsaga.snapshots`). The state type must be
    msgspec's."""
    snapshot_version: ClassVar[int] = 1
    """Bump it when `apply` changes what a state means without changing its type: the
    snapshots written before are then ignored and rebuilt."""

    def read_streams(self) -> list[str]:
        """The streams this command reads: the values of its `StreamId` fields."""
        cls = type(self)
        fields = Command._stream_field_cache.get(cls)
        if fields is None:
            fields = Command._stream_field_cache[cls] = _stream_fields(cls)
        streams: list[str] = []
        for name, many in fields:
            value: Any = getattr(self, name)
            if value is None:
                continue
            if many:
                streams.extend(value)
            else:
                streams.append(value)
        return streams

    def metric_label(self) -> str:
        """The command's label in metrics: its class name."""
        return type(self).__name__

    def fold_key(self) -> Hashable:
        """What identifies this command's fold in the executor's state cache: its type and
        streams. A command whose `initial_state` or `apply` reads its own fields adds them."""
        return (type(self), tuple(self.read_streams()))

    def resume(self, state: S) -> S:
        """A copy of a cached state, adjusted to this command before `handle` (default: as is)."""
        return state

    def merge(self, states: Mapping[str, S]) -> S:
        """With `fold_per_stream`: one state from each stream's (stream id -> state)."""
        raise NotImplementedError(f"{type(self).__name__} folds per stream: define merge()")

    def snapshot_spec(self) -> SnapshotSpec | None:
        """How this command's fold is snapshotted (from `snapshot_every`), or None."""
        cls = type(self)
        if not cls.snapshot_every:
            return None
        name = str(cls.__struct_config__.tag or cls.__name__)
        state_type = state_type_of(cls, Command)
        return SnapshotSpec(name, cls.snapshot_every, state_type, cls.snapshot_version)

    def to_snapshot(self, state: S) -> Any:
        """What a snapshot stores of `state` (an instance of the spec's state type)."""
        return state

    def from_snapshot(self, data: Any) -> S:
        """The state a snapshot's decoded `data` stands for."""
        return typing.cast(S, data)

    def initial_state(self) -> S:
        """The state before any event has been applied."""
        raise NotImplementedError(f"{type(self).__name__} must define initial_state()")

    def apply(self, state: S, event: RecordedEvent) -> S:
        """Fold one past event into the state and return the state."""
        raise NotImplementedError(f"{type(self).__name__} must define apply()")

    def more_streams(self, state: S) -> Iterable[str]:
        """Streams to read as well, decided after seeing the state (none by default).

        The executor reads them, folds their events into the state, asks again,
        and includes them in the same version check.
        """
        return ()

    def handle(self, state: S) -> Writes | WritePlan:
        """Decide: return the new events per stream, or raise a `DomainError`."""
        raise NotImplementedError(f"{type(self).__name__} must define handle()")


class StatelessCommand(Command[None], frozen=True):
    """A command that decides without state: it only writes (requests, replies, notes).

    Its streams are still read for the version check, but nothing is folded;
    subclasses define `handle` alone.
    """

    def initial_state(self) -> None:
        """No state."""
        return

    def apply(self, state: None, event: RecordedEvent) -> None:
        """Nothing to fold."""
        return
