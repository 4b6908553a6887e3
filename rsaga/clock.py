"""Where "now" comes from: the system clock in production, a manual one in tests."""

from __future__ import annotations

import time
from typing import Any, Protocol


class Clock(Protocol):
    """A source of wall-clock time in integer milliseconds since the Unix epoch."""

    def now_ms(self) -> int:
        """The current time in milliseconds since the epoch."""
        ...


class SystemClock:
    """The host's wall clock."""

    def now_ms(self) -> int:
        """The current time in milliseconds since the epoch."""
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to, so tests of time run in milliseconds."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms

    def now_ms(self) -> int:
        """The current (manual) time in milliseconds since the epoch."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds` (never backward)."""
        if seconds < 0:
            raise ValueError("a ManualClock only moves forward")
        self._now += round(seconds * 1000)

    def set_ms(self, now_ms: int) -> None:
        """Jump to `now_ms` (never backward)."""
        if now_ms < self._now:
            raise ValueError("a ManualClock only moves forward")
        self._now = now_ms


def time_reply_ms(reply: Any) -> int:
    """Milliseconds since the epoch from a Redis ``TIME`` reply (seconds, microseconds)."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


async def server_ms(redis: Any) -> int:
    """The Redis server's clock, in milliseconds since the epoch: the one clock every
    worker and scheduler agrees on."""
    return time_reply_ms(await redis.time())
