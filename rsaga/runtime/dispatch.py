"""Per-stream dispatch: entries of one stream run one after another, different streams
side by side; a suspect entry (one that went through a crash) runs alone in the process."""

from __future__ import annotations

import contextlib
from collections import deque
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


class Slots:
    """At most `total` entries of a worker running at once.

    As `anyio.CapacityLimiter`, but a free slot is taken without a trip through the
    event loop (the limiter yields once per acquire: ~20 us per entry, measured).
    Waiters are served first come, first served; a slot freed while some wait
    passes straight to the first of them.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"slots: need at least 1, got {total}")
        self.total = total
        self.taken = 0
        self._waiters: deque[anyio.Event] = deque()

    async def __aenter__(self) -> None:
        if self.taken < self.total and not self._waiters:
            self.taken += 1
            return
        handed = anyio.Event()
        self._waiters.append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():
                self._free()  # handed a slot while being cancelled: pass it on
            else:
                self._waiters.remove(handed)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._free()

    def _free(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # the slot stays taken, by the first waiter
        else:
            self.taken -= 1


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
