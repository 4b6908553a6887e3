"""Dead letters: entries a handler gave up on or could not decode, for operators to act on.

Each shard has one dead-letter stream. A dead letter records the handler, the
error (type, message, short traceback), the attempts, the original log entry id
and the original entry's fields: an event's bytes, or a due timeout's payload.
`replay` puts it back where it came from (the shard log, or the due stream, so
the timeout fires into its process again) for that group alone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from redis.asyncio import Redis

from rsaga.errors import ValidationError
from rsaga.keyspace import Keyspace
from rsaga.process.timeouts import decode_timeout
from rsaga.records import DeadLetterRecord
from rsaga.scripts import Scripts


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
    timeout: str = ""
    """For a dead-lettered timeout: its name (`stream_id` is its process's stream)."""


class ReplayReport(msgspec.Struct, frozen=True):
    """What `replay_all` did: the letters replayed, and each one it could not replay."""

    replayed: list[str]
    """Ids of the dead letters replayed (and removed)."""
    failed: dict[str, str]
    """Dead-letter id -> why it could not be replayed (it stays a dead letter)."""


def _dead_letter(shard: int, entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    letter = DeadLetterRecord.decode(fields)
    return DeadLetter(
        id=entry_id.decode(),
        shard=shard,
        handler=letter.handler,
        stream_id=letter.stream_id,
        version=letter.version,
        log_id=letter.log_id,
        error_type=letter.error_type,
        error=letter.error,
        traceback=letter.traceback,
        attempts=letter.attempts,
        deliveries=letter.deliveries,
        failed_at=datetime.fromtimestamp(letter.failed_at_ms / 1000, UTC),
        timeout=_timeout_name(letter.payload),
    )


def _timeout_name(payload: bytes | None) -> str:
    if payload is None:
        return ""
    try:
        return decode_timeout(payload).name
    except msgspec.DecodeError:
        return "(undecodable timeout)"


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
        """Put one dead letter back for its group: an event on the shard log, a timeout on
        the due stream. Returns the new entry id, or None if there is no such letter.

        A letter that only reports a failed process has nothing to replay:
        `ValidationError`.
        """
        self._shards(shard)
        new_id: bytes = await Scripts(self.redis, self.keyspace).replay_dead_letter(
            shard, dead_letter_id
        )
        if new_id == b"-":
            raise ValidationError(
                f"dead letter {dead_letter_id} reports a failed process; there is no event "
                "or timeout to replay (inspect the process, then drop the dead letter)"
            )
        return new_id.decode() or None

    async def replay_all(self, *, shard: int | None = None) -> ReplayReport:
        """Replay every dead letter, going on past any that cannot be replayed."""
        replayed: list[str] = []
        failed: dict[str, str] = {}
        for n in self._shards(shard):
            after = "-"
            while letters := await self.list(shard=n, after=after, limit=500):
                for letter in letters:
                    after = letter.id
                    try:
                        if await self.replay(letter.id, shard=n) is not None:
                            replayed.append(letter.id)
                    except ValidationError as exc:
                        failed[letter.id] = str(exc)
        return ReplayReport(replayed, failed)

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
