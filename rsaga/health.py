"""Liveness: heartbeats of workers and schedulers, kept in Redis with a TTL.

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
import msgspec
from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rsaga.errors import RedisUnavailable

log = logging.getLogger("rsaga.health")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, RedisUnavailable, OSError)
"""Errors that mean Redis is unreachable right now: wait and try again, never give up."""

_TRANSIENT_ERRORS = (ReadOnlyError, BusyLoadingError, OutOfMemoryError)
_TRANSIENT_PREFIXES = (
    "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "UNBLOCKED",
    "OOM", "NOREPLICAS",
)


def redis_down(exc: BaseException) -> bool:
    """Whether `exc` means Redis cannot serve us right now (unreachable, loading, read-only
    after a failover, out of memory, busy...): wait and retry; it is nobody's fault."""
    if isinstance(exc, (*REDIS_DOWN, *_TRANSIENT_ERRORS)):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_PREFIXES)


class Heartbeat(msgspec.Struct, frozen=True):
    """What a live worker or scheduler tells about itself in Redis."""

    consumer: str
    host: str
    pid: int
    handlers: list[str]
    started_at: float
    kind: str = "worker"


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


async def keep_heartbeat(
    redis: Redis, key: str, beat: Heartbeat, ttl: float, stop: anyio.Event
) -> None:
    """Renew `key` every third of `ttl` until `stop` is set, then delete it."""
    blob = msgspec.json.encode(beat)
    try:
        while not stop.is_set():
            try:
                await redis.set(key, blob, px=int(ttl * 1000))
            except Exception as exc:
                if not redis_down(exc):
                    raise
                log.warning("heartbeat failed: %s", exc)
            with anyio.move_on_after(ttl / 3):
                await stop.wait()
    finally:
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2),
            contextlib.suppress(*REDIS_DOWN),
        ):
            await redis.delete(key)
