"""The scheduler: moves due timeouts onto each shard's due stream, for workers to apply.

Timeouts are data in Redis (see `includes/timeouts.lua`): a sorted set per
shard scored by due time, written atomically with the events of the process
that scheduled them. The scheduler sleeps until the next due time, and is
woken early through the shard's wake stream when an earlier timeout is
scheduled, so there is no fixed poll. "Now" is the Redis server's clock unless
a `Clock` is given (tests).

Every `retention_interval` seconds it also removes finished processes whose
retention passed (`rsaga.process.retention`), in batches of `retention_batch`,
by the Redis server's clock (the one the process index's end times are from).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec
from redis.asyncio import Redis

from rsaga.clock import Clock
from rsaga.cluster import client_options
from rsaga.keyspace import Keyspace
from rsaga.observe import NO_OBSERVER, Observer
from rsaga.process.retention import Retention
from rsaga.runtime.liveness import (
    Backoff,
    consumer_name,
    keep_heartbeat,
    redis_outage,
    this_process,
)
from rsaga.scripts import Scripts

log = logging.getLogger("rsaga.scheduler")

_REDIS_TICK = 0.11
"""Granularity of a blocking read's timeout on the server (its hz), with a margin."""


class Tick(msgspec.Struct, frozen=True):
    """What one move did: timeouts moved, the next due time (None: none), server now."""

    moved: int
    next_due_ms: int | None
    now_ms: int


class Scheduler:
    """Drains due timeouts of every shard into the due streams; several may run at once."""

    def __init__(
        self,
        redis: Redis,
        keyspace: Keyspace,
        *,
        clock: Clock | None = None,
        batch_size: int = 1000,
        max_sleep: float = 5.0,
        heartbeat_ttl: float = 15.0,
        name: str | None = None,
        observer: Observer = NO_OBSERVER,
        shards: Sequence[int] | None = None,
        retention_interval: float | None = 60.0,
        retention_batch: int = 100,
    ) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.shards = list(range(keyspace.shards) if shards is None else shards)
        """The shards whose timeouts this scheduler drains: all by default."""
        self.scripts = Scripts(redis, keyspace)
        self.clock = clock
        self.batch_size = batch_size
        self.max_sleep = max_sleep
        self.heartbeat_ttl = heartbeat_ttl
        self.name = name or f"scheduler-{consumer_name()}"
        self.observer = observer
        self.retention_interval = retention_interval
        """Seconds between removals of expired finished processes; None: never."""
        # Retention compares with the end times the commits wrote, by the server's
        # clock: a test's manual clock does not decide it.
        self.retention = Retention(redis, keyspace, batch_size=retention_batch)

    async def tick(self, shard: int) -> Tick:
        """Move up to `batch_size` due timeouts of `shard` (one atomic script call)."""
        now = "" if self.clock is None else self.clock.now_ms()
        moved, next_due, now_ms = await self.scripts.move_due_timeouts(
            shard, self.batch_size, now
        )
        if int(moved):
            self.observer.timeouts_moved(shard, int(moved))
        return Tick(int(moved), None if int(next_due) < 0 else int(next_due), int(now_ms))

    async def drain(self, shard: int) -> int:
        """Move every timeout of `shard` that is due now, in batches; how many moved."""
        total = 0
        while True:
            tick = await self.tick(shard)
            total += tick.moved
            if tick.moved < self.batch_size:
                return total

    async def run(self, stop: anyio.Event) -> None:
        """Run until `stop` is set, one loop per shard."""
        log.info("scheduler %s starting on %d shard(s)", self.name, len(self.shards))
        async with anyio.create_task_group() as tg:
            beat = this_process(self.name, [], "scheduler")
            tg.start_soon(
                keep_heartbeat, self.redis, self.keyspace, beat, self.heartbeat_ttl, stop
            )
            for shard in self.shards:
                tg.start_soon(self._shard_loop, shard, stop)
                if self.retention_interval is not None:
                    tg.start_soon(self._retention_loop, shard, self.retention_interval, stop)
            await stop.wait()
            tg.cancel_scope.cancel()
        log.info("scheduler %s stopped", self.name)

    async def _shard_loop(self, shard: int, stop: anyio.Event) -> None:
        wake_key = self.keyspace.timeouts_wake(shard)
        last_wake = "$"
        backoff = Backoff(log)
        # A blocking read must return before the socket timeout, or redis-py
        # takes it for a dead connection.
        socket_timeout = client_options(self.redis).get("socket_timeout")
        longest = self.max_sleep if not socket_timeout else min(
            self.max_sleep, 0.8 * float(socket_timeout)
        )
        while not stop.is_set():
            with redis_outage() as outage:
                if last_wake == "$":
                    newest: Any = await self.redis.xrevrange(wake_key, count=1)
                    last_wake = newest[0][0].decode() if newest else "0-0"
                tick = await self.tick(shard)
                backoff.reset()
                if tick.moved >= self.batch_size:
                    continue
                sleep = longest
                if tick.next_due_ms is not None:
                    sleep = min(sleep, max(0.0, (tick.next_due_ms - tick.now_ms) / 1000))
                if sleep <= 0:
                    continue
                if sleep <= _REDIS_TICK:
                    # Redis ends a blocking read only on its server tick (100 ms at
                    # the default hz 10): sleep the last stretch here instead.
                    await anyio.sleep(sleep)
                    continue
                woken: Any = await self.redis.xread(
                    {wake_key: last_wake}, count=10, block=int((sleep - _REDIS_TICK) * 1000)
                )
                for _, entries in woken:
                    last_wake = entries[-1][0].decode()
            if outage.error is not None:
                await backoff.wait(f"scheduler (shard {shard})", outage.error)
                last_wake = "$"

    async def _retention_loop(self, shard: int, interval: float, stop: anyio.Event) -> None:
        backoff = Backoff(log)
        while not stop.is_set():
            with redis_outage() as outage:
                removed = await self.retention.sweep(shard)
                backoff.reset()
                for process_type, count in removed.items():
                    self.observer.processes_removed(process_type, count)
                    log.info("removed %d finished %s process(es) of shard %d (retention)",
                             count, process_type, shard)
            if outage.error is not None:
                await backoff.wait(f"retention (shard {shard})", outage.error)
                continue
            await anyio.sleep(interval)
