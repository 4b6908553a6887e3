"""Per-stream dispatch: entries of one stream run one after another, different streams
side by side; a suspect entry (one that went through a crash) runs alone in the process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import anyio


class Flushable(Protocol):
    """A subscription, as the isolation sees it: finished entries to acknowledge."""

    @property
    def acks_due(self) -> bool:
        """Whether finished entries wait to be acknowledged."""
        ...

    async def deliver(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run a call that hands entries to the subscription, under its delivery lock."""
        ...

    async def flush_acks(self, dispatch: bool = True) -> None:
        """Acknowledge what finished."""
        ...


class Gate:
    """Entries normally run side by side (shared); a suspect entry runs alone (exclusive).

    The shared path is the hot one: it costs two integer updates unless an
    exclusive holder is running or waiting.
    """

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._exclusive or self._waiting:
            await self._changed.wait()
        self._shared += 1
        try:
            yield
        finally:
            self._shared -= 1
            if self._waiting and not self._shared:
                self._notify()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._waiting += 1
        try:
            while self._exclusive or self._shared:
                await self._changed.wait()
        except BaseException:
            self._waiting -= 1
            self._notify()
            raise
        self._waiting -= 1
        self._exclusive = True
        try:
            yield
        finally:
            self._exclusive = False
            self._notify()


class Isolation:
    """One per worker: lets an entry that went through a crash run alone in the process.

    While it runs, every group of the process has its earlier work acknowledged
    and records that entry as the only one started, so if the process dies now,
    a take-over blames that entry and nothing else.
    """

    def __init__(self) -> None:
        self.gate = Gate()
        self.subscriptions: list[Flushable] = []

    async def flush_all(self) -> None:
        """Acknowledge the finished entries of every subscription of the process."""
        for sub in self.subscriptions:
            if sub.acks_due:
                await sub.deliver("acknowledging", sub.flush_acks)
