"""One consumer of one consumer group on one stream: the Redis side of a worker.

Every call is one script (one round trip) that changes the group's state
atomically; see the headers of the ``.lua`` files for what each one does. The
key idea is *stream ownership*: a consumer that holds in-flight entries of a
stream owns that stream for its group, and entries of that stream read by
other consumers are handed over to the owner inside the same script. So the
events of one stream reach a handler in version order even with many worker
processes, while different streams spread over all of them. A consumer that
falls silent for its claim timeout (by the server's clock) is taken over
whole: all its pending entries and streams at once, in log order, spread over
the live consumers. A take-over counts a delivery only for the entries the dead
consumer's handlers had started (`record_started`), never for those it merely
held.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rsaga.cluster import side_client
from rsaga.keyspace import Keyspace
from rsaga.records import stream_of
from rsaga.scripts import EncodableArg, Scripts

START_FROM_BEGINNING = "0"
START_FROM_NEW = "$"


class RawEntry(msgspec.Struct, frozen=True):
    """A log entry as Redis returned it, plus how often it has been delivered."""

    log_id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    @property
    def stream_id(self) -> str:
        """The ``s`` field as text, or '' if missing or not UTF-8."""
        try:
            return self.raw_stream_id.decode()
        except UnicodeDecodeError:
            return ""

    @property
    def raw_stream_id(self) -> bytes:
        """The ``s`` field exactly as stored (what the scripts count by), or b''."""
        return stream_of(self.fields)


def _entries(reply: Sequence[Any]) -> list[RawEntry]:
    out = []
    for entry_id, flat in reply:
        fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
        out.append(RawEntry(entry_id.decode(), fields))
    return out


def _with_deliveries(found: Sequence[Any], deliveries: Sequence[Any]) -> list[RawEntry]:
    return [
        msgspec.structs.replace(entry, deliveries=int(count))
        for entry, count in zip(_entries(found), deliveries, strict=True)
    ]


class ReadResult(msgspec.Struct, frozen=True):
    """Entries to run, in order, or where the log ends if there are none."""

    entries: list[RawEntry]
    last_id: str


class GroupConsumer:
    """The scripts of one consumer (`name`) of group `group` on shard `shard`."""

    def __init__(
        self,
        redis: Redis,
        keyspace: Keyspace,
        shard: int,
        group: str,
        name: str,
        *,
        claim_timeout_ms: int = 30_000,
        stream: str | None = None,
    ) -> None:
        self.redis = redis
        self.scripts = Scripts(redis, keyspace)
        self.shard = shard
        self.group = group
        self.name = name
        self.claim_timeout_ms = claim_timeout_ms
        """A consumer silent for longer than this is dead; others take over its entries."""
        self.log = stream or keyspace.log(shard)
        """The stream this group reads: the shard log, or the shard's due timeouts."""
        self.owners = keyspace.stream_owners(shard, group)
        self.counts = keyspace.in_flight(shard, group)
        self.handoffs = keyspace.handoffs(shard, group)
        self.alive = keyspace.consumers_alive(shard, group)
        self.dead_letters = keyspace.dead_letters(shard)
        self._waiter: Redis | None = None
        self._state_keys = [self.log, self.owners, self.counts, self.handoffs, self.alive]

    async def ensure_group(self, start: str = START_FROM_BEGINNING) -> bool:
        """Create the group if it does not exist; True if this call created it."""
        try:
            await self.redis.xgroup_create(self.log, self.group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    async def read(self, count: int, wanted: Collection[str] | None = None) -> ReadResult:
        """Entries to run next: handed over, taken over, and up to `count` new ones.

        With `wanted`, entries of other event types are acknowledged inside Redis
        and never reach Python; an empty `wanted` (a process type started only by
        `start`) wants no typed entry at all, where None wants every entry.
        """
        last_id, found, deliveries = await self.scripts.read_batch(
            self.log, self.shard, self.group, self.name, count, self.claim_timeout_ms, wanted
        )
        return ReadResult(_with_deliveries(found, deliveries), last_id.decode())

    async def wait_for_entries(self, after: str, block_ms: int) -> None:
        """Block until the log has an entry after `after`, or `block_ms` passes.

        Uses a connection of its own, so idle waits never starve the shared pool.
        """
        if self._waiter is None:
            self._waiter = side_client(self.redis, max_connections=2)
        await self._waiter.xread({self.log: after}, count=1, block=block_ms)

    async def close(self) -> None:
        """Close the waiting connection, if any."""
        if self._waiter is not None:
            await self._waiter.aclose()
            self._waiter = None

    async def pending_here(self, after: str, count: int) -> list[RawEntry]:
        """Entries pending on this consumer after `after`, in log order (with fields)."""
        reply: Any = await self.redis.xreadgroup(
            self.group, self.name, {self.log: after}, count=count
        )
        if not reply:
            return []
        _, found = reply[0] if isinstance(reply, list) else next(iter(reply.items()))
        return [RawEntry(i.decode(), f) for i, f in found if f]

    async def ack(
        self, entries: Sequence[RawEntry], handoff_limit: int = 100
    ) -> tuple[int, list[RawEntry]]:
        """Acknowledge `entries` (if still ours); returns how many, and new handoffs."""
        acked, handed, deliveries = await self.scripts.ack_batch(
            self.log, self.shard, self.group, self.name, handoff_limit,
            [(entry.log_id, entry.raw_stream_id) for entry in entries],
        )
        return int(acked), _with_deliveries(handed, deliveries)

    async def record_started(self, log_ids: Collection[str]) -> None:
        """Record the entries this consumer's handlers have started and not acknowledged.

        If this consumer dies, a take-over counts a delivery for these entries
        only (acknowledged ones among them are no longer pending: they do not
        count). One writer per consumer: each call replaces the last record.
        """
        field = f"running:{self.name}"
        if log_ids:
            await self.redis.hset(self.alive, field, " ".join(log_ids))
        else:
            await self.redis.hdel(self.alive, field)

    async def dead_letter(
        self, entry: RawEntry, fields: dict[str, EncodableArg], max_len: int
    ) -> str:
        """Record `entry` as a dead letter and acknowledge it, atomically.

        Returns the dead letter's id, or '' if another consumer has taken the entry
        over (then it is theirs to finish)."""
        dead_id: bytes = await self.scripts.dead_letter(
            self.log, self.shard, self.group, self.name, entry.log_id, entry.raw_stream_id,
            max_len, fields,
        )
        return dead_id.decode()

    async def caught_up(self) -> bool:
        """Whether the group has read the whole stream and nothing is pending."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_groups(self.log)
            pipe.xrevrange(self.log, count=1)
            try:
                groups, last = await pipe.execute()
            except ResponseError:
                return False
        if not last:
            return True
        for group in groups:
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            if name == self.group:
                return bool(group["pending"] == 0 and group["last-delivered-id"] == last[0][0])
        return False

    async def take_over_dead(self) -> tuple[list[RawEntry], list[str]]:
        """Take over consumers silent for longer than the claim timeout.

        Returns the entries taken over (in log order) and the dead consumers.
        """
        found, deliveries, dead = await self.scripts.take_over_dead(
            self.log, self.shard, self.group, self.name, self.claim_timeout_ms
        )
        return _with_deliveries(found, deliveries), [d.decode() for d in dead]

    async def keep_alive(self, *, leaving: bool = False) -> None:
        """Renew this consumer's claim on what it holds; `leaving` gives it up at once."""
        await self.scripts.keep_alive(self.shard, self.group, self.name, leaving=leaving)
