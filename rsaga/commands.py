"""Commands: declare the streams they read, fold them into state, decide what to write.

A command is a `msgspec.Struct`, so it can be stored and run by any worker.
Fields typed `StreamId` (or a list or tuple of them) are the streams it reads, as
EventCore's ``#[stream]`` fields are; `handle` may write only to those streams,
or to streams that `more_streams` asked for after seeing the state.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Generic, NewType, Protocol, TypeVar, runtime_checkable

import msgspec

from rsaga.events import RecordedEvent
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

    It names the streams it reads, folds their events into a state, and decides.
    """

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


class Command(msgspec.Struct, Generic[S], frozen=True, kw_only=True, tag=True):
    """Base class of commands over state `S`.

    Subclasses define `initial_state`, `apply` and `handle`; they may override
    `read_streams` (instead of `StreamId` fields) and `more_streams`.
    """

    _stream_field_cache: ClassVar[dict[type, tuple[tuple[str, bool], ...]]] = {}
    emits: ClassVar[tuple[type[msgspec.Struct], ...]] = ()
    """Event types `handle` may write. A process that issues the command registers them,
    so a worker can execute it whatever handlers it runs."""

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
