"""Retention: removes finished processes once their type's `retention` has passed.

The commit that finishes a process puts it in its type's `expiring` set, scored by
end + retention (the process index, ``includes/process_index.lua``). The scheduler
calls `Retention.sweep` every `scheduler.retention_interval`; each batch is one short
script call (``remove_expired.lua``) over at most `batch_size` processes, so Redis is
never blocked for long. A removed process leaves a one-entry tombstone stream
(`ProcessRemoved`): a late trigger folds a finished process and is ignored, where an
empty stream would start the process again.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from redis.asyncio import Redis

from rsaga.clock import Clock, time_reply_ms
from rsaga.errors import InvalidStreamId
from rsaga.events import EventCodec, EventRegistry, new_id
from rsaga.keyspace import FINISHED_OUTCOMES, Keyspace, validate_stream_id
from rsaga.process.engine import snapshot_fold
from rsaga.process.events import ProcessRemoved
from rsaga.scripts import Scripts

_codec = EventCodec(EventRegistry([ProcessRemoved]))
log = logging.getLogger("rsaga.retention")


def _text(raw: bytes) -> str | None:
    """`raw` as UTF-8 text, or None if it is not."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


class Expiring(msgspec.Struct, frozen=True):
    """A finished process in its type's `expiring` set."""

    process_type: str
    stream_id: str
    expires_ms: int
    """When its retention passes (ms since the epoch)."""


class Batch(msgspec.Struct, frozen=True):
    """What one removal call did: how many it removed, and whether more are due now."""

    removed: int
    more: bool


class Retention:
    """Removes finished processes whose retention passed, one bounded batch per call."""

    def __init__(
        self,
        redis: Redis,
        keyspace: Keyspace,
        *,
        batch_size: int = 100,
        clock: Clock | None = None,
    ) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.scripts = Scripts(redis, keyspace)
        self.batch_size = batch_size
        self.clock = clock
        """None: the Redis server's clock decides what is due (tests inject one)."""

    async def process_types(self, shard: int) -> list[str]:
        """The process types indexed on `shard`."""
        types: Any = await self.redis.smembers(self.keyspace.process_types(shard))
        return sorted(t for t in map(_text, types) if t is not None)

    async def due(
        self, shard: int, process_type: str, limit: int, *, within_ms: int = 0
    ) -> tuple[list[Expiring], int, list[bytes]]:
        """Up to `limit` processes of `process_type` on `shard` whose retention passed (or
        passes within `within_ms`), earliest first; the clock's now (ms) that decided; and
        the members among them that are no stream id (written by something else)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("TIME")  # not .time(): refused in a cluster pipeline
            pipe.zrange(
                self.keyspace.expiring_processes(shard, process_type), 0, limit - 1,
                withscores=True,
            )
            server_now, members = await pipe.execute()
        now = self.clock.now_ms() if self.clock else time_reply_ms(server_now)
        found, unreadable = [], []
        for member, score in members:
            if score > now + within_ms:
                break  # by score: the rest are later
            try:
                stream_id = validate_stream_id(_text(member) or "")
            except InvalidStreamId:
                unreadable.append(member)
                continue
            found.append(Expiring(process_type, stream_id, int(score)))
        return found, now, unreadable

    async def expiring(self, *, within: float = 0.0, limit: int = 1000) -> list[Expiring]:
        """Every shard's processes whose retention passes within `within` seconds (at most
        `limit` per type and shard), earliest first per type: what `rsaga archive` exports."""
        found: list[Expiring] = []
        for shard in range(self.keyspace.shards):
            for process_type in await self.process_types(shard):
                due, _, _ = await self.due(
                    shard, process_type, limit, within_ms=round(within * 1000)
                )
                found += due
        return found

    async def backfill(self, shard: int, process_type: str, retention_ms: int | None) -> int:
        """Give the finished processes of `process_type` on `shard` that have no expiry an
        expiry of end + `retention_ms` (None: kept for ever, nothing to do); how many.

        Processes that finished before retention existed (or while their type kept
        them for ever) are in the finished sets but in no `expiring` set, so nothing
        would ever remove them. Workers call this when they start, for the types they
        run; an expiry already set is left as it is (ZADD NX). Only the last 10,000
        finished processes per outcome are indexed: older ones cannot be found.
        """
        if retention_ms is None:
            return 0
        ks = self.keyspace
        expiring = ks.expiring_processes(shard, process_type)
        added = 0
        for outcome in FINISHED_OUTCOMES:
            finished: Any = await self.redis.zrange(
                ks.finished_processes(shard, process_type, outcome), 0, -1, withscores=True
            )
            for first in range(0, len(finished), 1000):  # bounded writes: Redis stays responsive
                expiries = {
                    member: int(ended) + retention_ms
                    for member, ended in finished[first:first + 1000]
                }
                count: Any = await self.redis.zadd(expiring, expiries, nx=True)
                added += int(count)
        return added

    async def remove_batch(self, shard: int, process_type: str) -> Batch:
        """Remove up to `batch_size` processes of `process_type` on `shard` that are due
        (one atomic script call, which checks again that each is due and finished)."""
        due, now, unreadable = await self.due(shard, process_type, self.batch_size)
        if unreadable:
            # Nothing can remove them and they would stop every sweep: drop them, say so.
            expiring = self.keyspace.expiring_processes(shard, process_type)
            await self.redis.zrem(expiring, *unreadable)
            log.warning("retention: dropped %d entries of %s that are no process stream id: %r",
                        len(unreadable), expiring, unreadable[:5])
        if not due:
            return Batch(0, bool(unreadable))
        tombstone = ProcessRemoved(process_type, now)
        candidates = [
            (item.stream_id, _codec.encode(
                tombstone, event_id=new_id(), occurred_at_ms=now, correlation_id="",
                causation_id=None,
            ))
            for item in due
        ]
        removed = await self.scripts.remove_expired(
            shard, process_type, candidates, "" if self.clock is None else now,
            snapshot_fold(process_type),
        )
        return Batch(int(removed), len(due) >= self.batch_size)

    async def sweep(self, shard: int) -> dict[str, int]:
        """Remove every process of `shard` that is due, batch after batch (other tasks and
        clients run in between); how many were removed, per process type (if any)."""
        removed: dict[str, int] = {}
        for process_type in await self.process_types(shard):
            while True:
                batch = await self.remove_batch(shard, process_type)
                if batch.removed:
                    removed[process_type] = removed.get(process_type, 0) + batch.removed
                if not batch.more:
                    break
                await anyio.lowlevel.checkpoint()
        return removed
