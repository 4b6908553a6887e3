"""Acting on one process as an operator: its state now, terminate, signal, retry.

Each action is one atomic commit through the process's own step, with an event on its stream
that says who did what (`ProcessTerminated`, `ProcessSignalled`, `ProcessRetried`), so the
history shows operators' hands as well as the process's. An action on a stream that holds no
process, or on a process that already ended, is refused and writes nothing.

The CLI (`rsaga process terminate|signal|retry|state`) and the console call this module.
"""

from __future__ import annotations

import getpass
import socket
from typing import Any

import msgspec

from rsaga.deadletters import DeadLetters
from rsaga.errors import EventDecodeError, UnknownEventType, ValidationError
from rsaga.events import RecordedEvent, new_id
from rsaga.process.api import (
    DefinitionError,
    OperatorAction,
    ProcessInfo,
    ProcessManager,
    ProcessNotFound,
)
from rsaga.process.events import ProcessRetried, ProcessStarted
from rsaga.process.runner import ProcessRunner
from rsaga.process.timeouts import decode_timeout
from rsaga.records import DeadLetterRecord, LogRecord, is_due_record, payload_of
from rsaga.runtime.sources import timeouts_group


class ProcessState(msgspec.Struct):
    """A process as its definition sees it now: rsaga's view and the user's folded state."""

    info: ProcessInfo
    state: Any
    """The process type's own state (`initial_state` folded with `apply`)."""


def operator_name() -> str:
    """Who acts, as recorded in the process's stream: ``user@host`` of this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class Operator:
    """Operator actions on processes of the types `runner` knows.

    `by` names the operator in the events the actions write (default: ``user@host``).
    """

    def __init__(self, runner: ProcessRunner, *, by: str | None = None) -> None:
        self.runner = runner
        self.store = runner.executor.store
        self.by = by or operator_name()

    async def _locate(self, stream_id: str) -> tuple[ProcessManager[Any], str, list[RecordedEvent]]:
        """The manager and process id of the process on `stream_id`, with its events."""
        events = (await self.store.read(stream_id)).events
        started = next((e.data for e in events if isinstance(e.data, ProcessStarted)), None)
        if started is None:
            raise ProcessNotFound(f"no process with stream {stream_id!r}")
        manager = self.runner.manager(started.process_type)
        return manager, started.process_id, events

    async def state(self, stream_id: str) -> ProcessState:
        """The process's state now, folded from its stream by its installed definition."""
        manager, process_id, events = await self._locate(stream_id)
        info, state = self.runner.fold(manager, process_id, events)
        return ProcessState(info, state)

    async def _act(
        self,
        stream_id: str,
        action: OperatorAction,
        key: str,
        located: tuple[ProcessManager[Any], str, list[RecordedEvent]] | None = None,
    ) -> tuple[ProcessState, list[RecordedEvent]]:
        """Run `action` as one step; the process's state after it, and the events since the
        read that located it (read once, from where that read ended)."""
        manager, process_id, events = located or await self._locate(stream_id)
        await self.runner.step(
            manager, process_id, action, key=key,
            correlation_id=events[0].correlation_id if events else None,
        )
        since = (await self.store.read(stream_id, from_version=len(events) + 1)).events
        info, state = self.runner.fold(manager, process_id, [*events, *since])
        return ProcessState(info, state), since

    async def terminate(
        self, stream_id: str, reason: str, *, compensate: bool = False
    ) -> ProcessState:
        """End an active process as failed, its timeouts cancelled; with `compensate`, a saga
        first undoes its steps (the running one too) and ends compensated."""
        if not reason.strip():
            raise ValidationError("terminate: give a reason (it is recorded with your name)")
        action = OperatorAction(action="terminate", by=self.by, reason=reason,
                                compensate=compensate)
        return (await self._act(stream_id, action, f"operator:terminate:{new_id()}"))[0]

    async def signal(self, stream_id: str, data: Any, *, key: str | None = None) -> ProcessState:
        """Deliver `data` to the process's `decide` as an `AdvanceTrigger`, once per `key`
        (default: a new key, so every call delivers)."""
        action = OperatorAction(action="signal", by=self.by, data=data)
        return (await self._act(stream_id, action, f"operator:signal:{key or new_id()}"))[0]

    async def retry(self, stream_id: str, *, timer: str | None = None) -> str:
        """Re-run the process's current step now; says what it re-ran.

        A trigger of this process that was dead-lettered is re-delivered (the latest);
        otherwise the pending timeout named `timer`, or the next one due (the deadline
        aside), fires now, as if its time had come.
        """
        located = await self._locate(stream_id)
        manager, process_id, _ = located
        letter = None if timer is not None else await self._dead_letter_of(manager, process_id)
        action = OperatorAction(
            action="retry", by=self.by, timeout=timer,
            dead_letter=f"{letter[0]}/{letter[1]}" if letter else "",
        )
        state, written = await self._act(
            stream_id, action, f"operator:retry:{new_id()}", located
        )
        if letter is None:
            what = next(e.data.what for e in written if isinstance(e.data, ProcessRetried))
            return f"fired {what} (the process is {state.info.status})"
        shard, letter_id = letter
        await DeadLetters(self.store.redis, self.store.keyspace).replay(letter_id, shard=shard)
        return f"re-delivered dead letter {shard}/{letter_id}"

    async def _dead_letter_of(
        self, manager: ProcessManager[Any], process_id: str
    ) -> tuple[int, str] | None:
        """The latest dead letter of a trigger of this process, as (shard, id), if any."""
        redis, keyspace = self.store.redis, self.store.keyspace
        found: tuple[int, str] | None = None
        groups = {manager.name, timeouts_group(manager.name)}  # its events, its timeouts
        for shard in range(keyspace.shards):
            entries: Any = await redis.xrevrange(keyspace.dead_letters(shard), count=1000)
            for entry_id, fields in entries:
                if DeadLetterRecord.decode(fields).handler not in groups:
                    continue
                if self._triggers(manager, process_id, fields):
                    if found is None or _later(entry_id.decode(), found[1]):
                        found = (shard, entry_id.decode())
                    break
        return found

    def _triggers(
        self, manager: ProcessManager[Any], process_id: str, fields: dict[bytes, bytes]
    ) -> bool:
        """Whether a dead letter's entry (a timeout or an event) was a trigger of the process."""
        try:
            if is_due_record(fields):
                return decode_timeout(payload_of(fields)).process_id == process_id
            record = LogRecord.decode(fields)
            if not record.stream_id:
                return False
            event = self.store.codec.decode(record.stream_id, record.version, record.envelope)
            return ProcessRunner.correlate(manager, event) == process_id
        except (msgspec.DecodeError, EventDecodeError, UnknownEventType, DefinitionError,
                KeyError, ValueError):
            return False


def _later(a: str, b: str) -> bool:
    """Whether stream entry id `a` is after `b`."""
    ms_a, _, seq_a = a.partition("-")
    ms_b, _, seq_b = b.partition("-")
    return (int(ms_a), int(seq_a or 0)) > (int(ms_b), int(seq_b or 0))
