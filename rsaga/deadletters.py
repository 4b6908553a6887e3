"""Dead letters: entries a handler gave up on or could not decode, for operators to act on.

Each shard has one dead-letter stream. A dead letter records the handler, the
error (type, message, short traceback), the attempts, the original log entry id
and the original event bytes, so `replay` can put it back on the shard log for
that handler alone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from redis.asyncio import Redis

from rsaga.errors import ValidationError
from rsaga.keyspace import Keyspace
from rsaga.scripts import script


class DeadLetter(msgspec.Struct, frozen=True):
    """One dead letter, as an operator sees it."""

    id: str
    shard: int
    handler: str
    stream_id: str
    version: int | None
    log_id: str
    error_type: str
    error: str
    traceback: str
    attempts: int
    deliveries: int
    failed_at: datetime


def _text(fields: dict[bytes, bytes], name: bytes, default: str = "") -> str:
    return fields.get(name, default.encode()).decode(errors="replace")


def _dead_letter(shard: int, entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    version = fields.get(b"v")
    return DeadLetter(
        id=entry_id.decode(),
        shard=shard,
        handler=_text(fields, b"handler"),
        stream_id=_text(fields, b"s"),
        version=int(version) if version and version.isdigit() else None,
        log_id=_text(fields, b"log_id"),
        error_type=_text(fields, b"error_type"),
        error=_text(fields, b"error"),
        traceback=_text(fields, b"traceback"),
        attempts=int(_text(fields, b"attempts", "0") or 0),
        deliveries=int(_text(fields, b"deliveries", "0") or 0),
        failed_at=datetime.fromtimestamp(int(_text(fields, b"failed_at_ms", "0")) / 1000, UTC),
    )


class DeadLetters:
    """List, replay and drop the dead letters of every shard."""

    def __init__(self, redis: Redis, keyspace: Keyspace) -> None:
        self.redis = redis
        self.keyspace = keyspace

    def _shards(self, shard: int | None) -> range:
        if shard is None:
            return range(self.keyspace.shards)
        if not 0 <= shard < self.keyspace.shards:
            raise ValidationError(f"shard must be in 0..{self.keyspace.shards - 1}, got {shard}")
        return range(shard, shard + 1)

    async def count(self, shard: int | None = None) -> int:
        """How many dead letters there are (on one shard, or all)."""
        total = 0
        for n in self._shards(shard):
            total += int(await self.redis.xlen(self.keyspace.dead_letters(n)))
        return total

    async def list(
        self, *, shard: int | None = None, after: str = "-", limit: int = 100
    ) -> list[DeadLetter]:
        """Up to `limit` dead letters per shard, oldest first, after the id `after`."""
        start = after if after == "-" else f"({after}"
        found: list[DeadLetter] = []
        for n in self._shards(shard):
            page: Any = await self.redis.xrange(
                self.keyspace.dead_letters(n), start, "+", count=limit
            )
            found.extend(_dead_letter(n, entry_id, fields) for entry_id, fields in page)
        return found

    async def replay(self, dead_letter_id: str, *, shard: int = 0) -> str | None:
        """Put one dead letter back on the log for its handler; the new log id, or None."""
        self._shards(shard)
        new_id: bytes = await script("replay_dead_letter")(
            self.redis,
            [self.keyspace.dead_letters(shard), self.keyspace.log(shard)],
            [dead_letter_id],
        )
        if new_id == b"-":
            raise ValidationError(
                f"dead letter {dead_letter_id} reports a failed process; there is no event "
                "to replay (inspect the process, then drop the dead letter)"
            )
        return new_id.decode() or None

    async def replay_all(self, *, shard: int | None = None) -> int:
        """Replay every dead letter; returns how many were replayed."""
        replayed = 0
        for n in self._shards(shard):
            after = "-"
            while letters := await self.list(shard=n, after=after, limit=500):
                for letter in letters:
                    after = letter.id
                    if letter.log_id:
                        replayed += await self.replay(letter.id, shard=n) is not None
        return replayed

    async def drop(self, dead_letter_id: str, *, shard: int = 0) -> bool:
        """Delete one dead letter; True if it existed."""
        self._shards(shard)
        return bool(await self.redis.xdel(self.keyspace.dead_letters(shard), dead_letter_id))

    async def drop_all(self, *, shard: int | None = None) -> int:
        """Delete every dead letter; returns how many there were."""
        dropped = 0
        for n in self._shards(shard):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xlen(self.keyspace.dead_letters(n))
                pipe.delete(self.keyspace.dead_letters(n))
                length, _ = await pipe.execute()
            dropped += int(length)
        return dropped
