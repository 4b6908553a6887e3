"""Liveness: whether Redis can serve us, heartbeats of workers and schedulers (kept in
Redis with a TTL), consumer names, and the wait while Redis is away.

A process that stops gracefully deletes its heartbeat; one that dies lets it
expire. `rsaga health` reads them to tell which processes are alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

import anyio
from redis.asyncio import Redis
from redis.exceptions import (
    BusyLoadingError,
    ClusterError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rsaga.errors import RedisUnavailable
from rsaga.events import new_id
from rsaga.keyspace import Keyspace
from rsaga.records import Heartbeat

log = logging.getLogger("rsaga.health")  # the heartbeat's messages, as before the move

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, RedisUnavailable, OSError)
"""Errors that mean Redis is unreachable right now: wait and try again, never give up."""

_TRANSIENT_ERRORS = (
    ReadOnlyError, BusyLoadingError, OutOfMemoryError,
    # A Redis Cluster failing over or resharding: the client reads the slot map again.
    ClusterError, TryAgainError, SlotNotCoveredError,
)
_TRANSIENT_PREFIXES = (
    "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "UNBLOCKED",
    "OOM", "NOREPLICAS",
)


def redis_down(exc: BaseException) -> bool:
    """Whether `exc` means Redis cannot serve us right now (unreachable, loading, read-only
    after a failover, out of memory, busy...): wait and retry; it is nobody's fault."""
    if isinstance(exc, (*REDIS_DOWN, *_TRANSIENT_ERRORS)):
        return True
    if isinstance(exc, RedisClusterException) and "cannot be connected" in str(exc):
        return True  # no node of a cluster answered while reading its slot map
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_PREFIXES)


def this_process(name: str, handlers: list[str], kind: str) -> Heartbeat:
    """The heartbeat of the current process."""
    return Heartbeat(
        consumer=name,
        host=socket.gethostname(),
        pid=os.getpid(),
        handlers=handlers,
        started_at=time.time(),
        kind=kind,
    )


FORGET_DEAD_AFTER_MS = 3_600_000
"""How long the name of a consumer that died (its heartbeat expired) stays in the
heartbeats index before a live one's renewal removes it."""


async def write_heartbeat(redis: Redis, keyspace: Keyspace, beat: Heartbeat, ttl: float) -> None:
    """Write (or renew) `beat` for `ttl` seconds and name it in the heartbeats index."""
    now_ms = int(time.time() * 1000)
    ttl_ms = int(ttl * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(keyspace.heartbeat(beat.consumer), beat.encode(), px=ttl_ms)
        pipe.zadd(keyspace.heartbeats(), {beat.consumer: now_ms + ttl_ms})
        pipe.zremrangebyscore(keyspace.heartbeats(), "-inf", now_ms - FORGET_DEAD_AFTER_MS)
        await pipe.execute()


async def keep_heartbeat(
    redis: Redis, keyspace: Keyspace, beat: Heartbeat, ttl: float, stop: anyio.Event
) -> None:
    """Renew `beat` every third of `ttl` until `stop` is set, then delete it.

    The heartbeat is a key with a TTL; the heartbeats index names it, so that
    `rsaga health` finds every heartbeat without scanning the keyspace.
    """
    try:
        while not stop.is_set():
            with redis_outage() as outage:
                await write_heartbeat(redis, keyspace, beat, ttl)
            if outage.error is not None:
                log.warning("heartbeat failed: %s", outage.error)
            with anyio.move_on_after(ttl / 3):
                await stop.wait()
    finally:
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2),
            contextlib.suppress(*REDIS_DOWN),
        ):
            await redis.delete(keyspace.heartbeat(beat.consumer))
            await redis.zrem(keyspace.heartbeats(), beat.consumer)


def consumer_name() -> str:
    """A consumer name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{new_id()[-6:]}"


class redis_outage:
    """Swallow an exception that means Redis is away (`redis_down`); re-raise any other.

    ``with redis_outage() as outage: ...`` then ``outage.error`` is what was
    swallowed, or None if the block succeeded.
    """

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Exception | None = None

    def __enter__(self) -> redis_outage:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, Exception) and redis_down(exc):
            self.error = exc
            return True
        return False


class Backoff:
    """Exponential wait while Redis is away: 0.1 s doubling to 5 s; `reset` on success."""

    FIRST = 0.1
    LAST = 5.0

    def __init__(self, logger: logging.Logger = log) -> None:
        self.delay = self.FIRST
        self._log = logger

    def reset(self) -> None:
        """Redis answered: the next outage starts from the shortest wait."""
        self.delay = self.FIRST

    async def wait(self, what: str, exc: BaseException) -> None:
        """Log that Redis is away during `what`, then wait (longer each time)."""
        self._log.warning(
            "redis unavailable during %s: %s; retrying in %.1fs", what, exc, self.delay
        )
        await anyio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.LAST)
