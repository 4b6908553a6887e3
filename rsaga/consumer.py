"""One consumer of one consumer group on one shard log: the Redis side of a worker.

Every call is one script (one round trip) that changes the group's state
atomically; see the headers of the ``.lua`` files for what each one does. The
key idea is *stream ownership*: a consumer that holds in-flight entries of a
stream owns that stream for its group, and entries of that stream read by
other consumers are handed over to the owner inside the same script. So the
events of one stream reach a handler in version order even with many worker
processes, while different streams spread over all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rsaga.keyspace import Keyspace
from rsaga.scripts import EncodableArg, script

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
            return self.fields.get(b"s", b"").decode()
        except UnicodeDecodeError:
            return ""


def _entries(reply: Sequence[Any]) -> list[RawEntry]:
    out = []
    for entry_id, flat in reply:
        fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
        out.append(RawEntry(entry_id.decode(), fields))
    return out


class ReadResult(msgspec.Struct, frozen=True):
    """Entries handed over by other consumers, new entries, and where the log ends."""

    handed: list[RawEntry]
    new: list[RawEntry]
    last_id: str


class GroupConsumer:
    """The scripts of one consumer (`name`) of group `group` on shard `shard`."""

    def __init__(
        self, redis: Redis, keyspace: Keyspace, shard: int, group: str, name: str
    ) -> None:
        self.redis = redis
        self.shard = shard
        self.group = group
        self.name = name
        self.log = keyspace.log(shard)
        self.owners = keyspace.stream_owners(shard, group)
        self.counts = keyspace.in_flight(shard, group)
        self.handoffs = keyspace.handoffs(shard, group)
        self.dead_letters = keyspace.dead_letters(shard)
        self._state_keys = [self.log, self.owners, self.counts, self.handoffs]

    async def ensure_group(self, start: str = START_FROM_BEGINNING) -> bool:
        """Create the group if it does not exist; True if this call created it."""
        try:
            await self.redis.xgroup_create(self.log, self.group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    async def read(self, count: int) -> ReadResult:
        """Handed-over entries and up to `count` new ones (see read_batch.lua)."""
        last_id, handed, new = await script("read_batch")(
            self.redis, self._state_keys, [self.group, self.name, count]
        )
        return ReadResult(_entries(handed), _entries(new), last_id.decode())

    async def wait_for_entries(self, after: str, block_ms: int) -> None:
        """Block until the log has an entry after `after`, or `block_ms` passes."""
        await self.redis.xread({self.log: after}, count=1, block=block_ms)

    async def ack(self, entries: Sequence[RawEntry]) -> tuple[int, list[RawEntry]]:
        """Acknowledge `entries`; returns how many were still pending and new handoffs."""
        args: list[EncodableArg] = [self.group, self.name]
        for entry in entries:
            args += [entry.log_id, entry.stream_id]
        acked, handed = await script("ack_batch")(self.redis, self._state_keys, args)
        return int(acked), _entries(handed)

    async def dead_letter(
        self, entry: RawEntry, fields: dict[str, EncodableArg], max_len: int
    ) -> str:
        """Record `entry` as a dead letter and acknowledge it, atomically."""
        args: list[EncodableArg] = [self.group, entry.log_id, entry.stream_id, max_len]
        for key, value in fields.items():
            args += [key, value]
        keys = [self.log, self.owners, self.counts, self.dead_letters]
        dead_id: bytes = await script("dead_letter")(self.redis, keys, args)
        return dead_id.decode()

    async def claim_stale(
        self, min_idle_ms: int, start: str = "0-0", count: int = 100
    ) -> tuple[str, list[RawEntry]]:
        """Reclaim entries idle longer than `min_idle_ms`; returns (cursor, entries)."""
        cursor, found, deliveries = await script("claim_stale")(
            self.redis,
            [self.log, self.owners],
            [self.group, self.name, min_idle_ms, start, count],
        )
        entries = [
            msgspec.structs.replace(e, deliveries=int(d))
            for e, d in zip(_entries(found), deliveries, strict=True)
        ]
        return cursor.decode(), entries

    async def touch(self, log_ids: Sequence[str], idle_ms: int = 0) -> list[str]:
        """Set the idle time of entries still held; returns the ids no longer held."""
        if not log_ids:
            return []
        lost = await script("touch_claims")(
            self.redis, [self.log], [self.group, self.name, idle_ms, *log_ids]
        )
        return [x.decode() for x in lost]

    async def remove_idle_consumers(self, idle_ms: int) -> list[str]:
        """Delete consumers of the group with nothing pending, idle over `idle_ms`."""
        removed = []
        for info in await self.redis.xinfo_consumers(self.log, self.group):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name != self.name and info["pending"] == 0 and info["idle"] > idle_ms:
                await self.redis.xgroup_delconsumer(self.log, self.group, name)
                removed.append(name)
        return removed
