"""Every Redis key rsaga uses is named here, and nowhere else.

Keys that belong to a shard carry the shard as a Redis Cluster hash tag
(``rsaga:{0}:...``), so every multi-key script touches one hash slot and stays
legal on Redis Cluster. A stream id maps to exactly one shard.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from rsaga.errors import CrossShardWrite, InvalidStreamId, ValidationError

MAX_STREAM_ID_LENGTH = 200

FINISHED_OUTCOMES = ("completed", "failed", "compensated")
"""How a process can finish: each has a sorted set of its own (`finished_processes`)."""
# Braces would fight the hash tag, whitespace and glob characters would break
# SCAN patterns and the CLI; everything else printable is fine.
_STREAM_ID = re.compile(r"[A-Za-z0-9._:@/+=~!$%&()<>,;|^#-]+")
_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,50}")


def validate_stream_id(stream_id: object) -> str:
    """Return `stream_id` if the keyspace can carry it, else raise `InvalidStreamId`."""
    if not isinstance(stream_id, str):
        raise InvalidStreamId(f"stream id must be a str, got {type(stream_id).__name__}")
    if not stream_id:
        raise InvalidStreamId("stream id is empty")
    if len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise InvalidStreamId(
            f"stream id is {len(stream_id)} characters long; the limit is {MAX_STREAM_ID_LENGTH}"
        )
    if _STREAM_ID.fullmatch(stream_id) is None:
        bad = next(c for c in stream_id if _STREAM_ID.fullmatch(c) is None)
        raise InvalidStreamId(f"stream id {stream_id!r} contains the character {bad!r}")
    return stream_id


@dataclass(frozen=True, slots=True)
class Keyspace:
    """Owns every key name: a prefix, a shard count, and the shard of each stream id."""

    prefix: str = "rsaga"
    shards: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or _PREFIX.fullmatch(self.prefix) is None:
            raise ValidationError(
                f"prefix {self.prefix!r} must be 1-50 characters of letters, digits, '.', '_', '-'"
            )
        if not isinstance(self.shards, int) or not 1 <= self.shards <= 16384:
            raise ValidationError(f"shards must be an int from 1 to 16384, got {self.shards!r}")

    def shard_of(self, stream_id: str) -> int:
        """The shard that holds `stream_id` (stable for a given shard count)."""
        if self.shards == 1:
            return 0
        return zlib.crc32(stream_id.encode()) % self.shards

    def shard_of_all(self, stream_ids: list[str]) -> int:
        """The one shard all `stream_ids` share; `CrossShardWrite` if they do not."""
        shards = {self.shard_of(s) for s in stream_ids}
        if len(shards) > 1:
            by_shard = sorted((self.shard_of(s), s) for s in stream_ids)
            raise CrossShardWrite(
                "one atomic write must stay in one shard; streams map to shards "
                + ", ".join(f"{s}->{n}" for n, s in by_shard)
            )
        return shards.pop() if shards else 0

    def _tag(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}"

    # --- keys of one shard (all share the shard's hash tag) -------------------

    def stream(self, stream_id: str) -> str:
        """Redis Stream holding the events of one stream id; entry id ``<version>-0``."""
        return f"{self._tag(self.shard_of(stream_id))}:s:{stream_id}"

    def snapshot(self, stream_id: str, fold: str) -> str:
        """Hash: the latest snapshot of fold `fold` over one stream, fields v (its version)
        and d (see `rsaga.snapshots`)."""
        return f"{self._tag(self.shard_of(stream_id))}:snap:{fold}:{stream_id}"

    def log(self, shard: int) -> str:
        """The shard log: every event of the shard in commit order; consumer groups read it."""
        return f"{self._tag(shard)}:log"

    def dead_letters(self, shard: int) -> str:
        """Stream of entries that handlers gave up on or could not decode."""
        return f"{self._tag(shard)}:dlq"

    def stream_owners(self, shard: int, group: str) -> str:
        """Hash: stream id -> consumer that owns its in-flight entries for `group`."""
        return f"{self._tag(shard)}:own:{group}"

    def in_flight(self, shard: int, group: str) -> str:
        """Hash: stream id -> number of its entries pending for `group`."""
        return f"{self._tag(shard)}:inflight:{group}"

    def consumers_alive(self, shard: int, group: str) -> str:
        """Hash: consumer -> when it last said it was alive (server ms; 0 when it left)."""
        return f"{self._tag(shard)}:alive:{group}"

    def handoffs(self, shard: int, group: str) -> str:
        """Hash: consumer -> count of entries handed to it by other consumers of `group`."""
        return f"{self._tag(shard)}:handoff:{group}"

    def timeouts(self, shard: int) -> str:
        """Sorted set: timeout id -> due time (ms since the epoch)."""
        return f"{self._tag(shard)}:timeouts"

    def timeout_data(self, shard: int) -> str:
        """Hash: timeout id -> timeout payload."""
        return f"{self._tag(shard)}:timeout-data"

    def timeouts_wake(self, shard: int) -> str:
        """Stream the scheduler blocks on; written when an earlier timeout is scheduled."""
        return f"{self._tag(shard)}:timeouts-wake"

    def due_timeouts(self, shard: int) -> str:
        """Stream of timeouts that are due, which workers consume with a consumer group."""
        return f"{self._tag(shard)}:due"

    def active_processes(self, shard: int, process_type: str) -> str:
        """Sorted set: process stream id -> last progress (server ms), while active with no
        pending timeout (one with a timeout is in `waiting_processes`)."""
        return f"{self._tag(shard)}:active:{process_type}"

    def waiting_processes(self, shard: int, process_type: str) -> str:
        """Sorted set: active process stream id -> due time of its earliest pending timeout."""
        return f"{self._tag(shard)}:waiting:{process_type}"

    def process_stats(self, shard: int, process_type: str) -> str:
        """Hash: started, completed, failed, compensated, duration_ms_total of a process type."""
        return f"{self._tag(shard)}:stats:{process_type}"

    def process_durations(self, shard: int, process_type: str) -> str:
        """List: the last 1000 durations (ms) of finished processes of a type."""
        return f"{self._tag(shard)}:durations:{process_type}"

    def finished_processes(self, shard: int, process_type: str, outcome: str) -> str:
        """Sorted set: the last 10000 completed (failed, compensated) processes by end time."""
        return f"{self._tag(shard)}:{outcome}:{process_type}"

    def processes_since(self, shard: int, process_type: str) -> str:
        """Sorted set: active process stream id -> its start (server ms)."""
        return f"{self._tag(shard)}:since:{process_type}"

    def retrying_processes(self, shard: int, process_type: str) -> str:
        """Sorted set: active process stream id -> retries of its current step, while retrying."""
        return f"{self._tag(shard)}:retrying:{process_type}"

    def process_records(self, shard: int, process_type: str) -> str:
        """Hash: process stream id -> JSON record (correlation id, start, end, outcome, retried
        step and retries) of every indexed process of a type."""
        return f"{self._tag(shard)}:records:{process_type}"

    def processes_by_correlation(self, shard: int, process_type: str) -> str:
        """Sorted set, scores 0: ``<correlation id>\\0<stream id>`` of every indexed process."""
        return f"{self._tag(shard)}:by-correlation:{process_type}"

    def processes_by_id(self, shard: int, process_type: str) -> str:
        """Sorted set, scores 0: stream id of every indexed process (prefix search)."""
        return f"{self._tag(shard)}:by-id:{process_type}"

    def expiring_processes(self, shard: int, process_type: str) -> str:
        """Sorted set: finished process stream id -> when its retention passes (server ms):
        what the scheduler removes (a process kept for ever is not in it)."""
        return f"{self._tag(shard)}:expiring:{process_type}"

    def process_types(self, shard: int) -> str:
        """Set: every process type with a lifecycle index on the shard."""
        return f"{self._tag(shard)}:process-types"

    def process_index(self, shard: int, process_type: str) -> list[str]:
        """Every key of a process type's lifecycle index, in the order commit.lua takes them."""
        return [
            self.active_processes(shard, process_type),
            self.process_stats(shard, process_type),
            self.process_durations(shard, process_type),
            *(self.finished_processes(shard, process_type, o) for o in FINISHED_OUTCOMES),
            self.waiting_processes(shard, process_type),
            self.processes_since(shard, process_type),
            self.retrying_processes(shard, process_type),
            self.process_records(shard, process_type),
            self.processes_by_correlation(shard, process_type),
            self.processes_by_id(shard, process_type),
            self.process_types(shard),
            self.expiring_processes(shard, process_type),
        ]

    # --- keys outside any shard -------------------------------------------------

    def shard_count(self) -> str:
        """String: the shard count the keyspace was created with (set on first use)."""
        return f"{self.prefix}:shards"

    def heartbeat(self, consumer: str) -> str:
        """String with TTL: a live worker or scheduler's description."""
        return f"{self.prefix}:heartbeat:{consumer}"

    def heartbeats(self) -> str:
        """Sorted set: consumer -> when its heartbeat expires (its host's ms): who to look for."""
        return f"{self.prefix}:heartbeats"

    def heartbeat_pattern(self) -> str:
        """SCAN pattern matching every heartbeat key."""
        return f"{self.prefix}:heartbeat:*"
