"""Loads the Lua scripts in ``rsaga/lua/`` and runs them with EVALSHA.

Each ``.lua`` file is one atomic state change. Shared helpers live in
``lua/includes/``, one ``local function`` per file, pulled in with a line
``-- @include "name"``; each include is expanded once per script, and a cycle
is an error. On NOSCRIPT (a restarted or flushed server, a replica promoted by a
failover, a cluster node that never saw the script) the call is repeated once with
EVAL, which runs the script on the node that owns the keys and caches it there.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from rsaga.batching import batcher_for
from rsaga.errors import RsagaError, ValidationError
from rsaga.keyspace import Keyspace

_INCLUDE = re.compile(r'^--\s*@include\s+"([A-Za-z0-9_]+)"\s*$', re.MULTILINE)

EncodableArg = bytes | str | int | float


class ScriptLoadError(RsagaError):
    """A Lua file is missing or its includes form a cycle."""


def _read(relative: str) -> str:
    path = resources.files("rsaga").joinpath("lua", relative)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptLoadError(f"Lua file not found: rsaga/lua/{relative}") from None


def expand_includes(source: str, read_include: Any = None, _stack: tuple[str, ...] = ()) -> str:
    """Expand ``-- @include "name"`` lines recursively; each include appears once."""
    reader = read_include or (lambda name: _read(f"includes/{name}.lua"))
    seen: set[str] = set()

    def expand(text: str, stack: tuple[str, ...]) -> str:
        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in stack:
                raise ScriptLoadError("include cycle: " + " -> ".join((*stack, name)))
            if name in seen:
                return f"-- ({name} already included)"
            seen.add(name)
            return expand(reader(name), (*stack, name))

        return _INCLUDE.sub(replace, text)

    return expand(source, _stack)


class Script:
    """One Lua script: its expanded source, SHA1, and an EVALSHA call with NOSCRIPT fallback."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(
        self, redis: Redis, keys: Sequence[str], args: Sequence[EncodableArg]
    ) -> Any:
        """Run the script; send its source if the node does not know it.

        On one node the call is pipelined with the other script calls of this turn of
        the event loop (`rsaga.batching`). On a cluster each call is a round trip of its
        own: redis-py's cluster pipeline lost calls when a master failed over mid-batch
        (tests/test_cluster.py), and the client's own routing follows MOVED and ASK."""
        if isinstance(redis, RedisCluster):
            try:
                return await redis.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                # Not SCRIPT LOAD: that goes to every master, and one master down
                # would stop the shards of all the others.
                return await redis.eval(self.source, len(keys), *keys, *args)
        batcher = batcher_for(redis)
        try:
            return await batcher.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await batcher.execute("EVAL", self.source, len(keys), *keys, *args)

    async def load(self, redis: Redis) -> None:
        """Load the script into the server's script cache (every master of a cluster)."""
        await redis.script_load(self.source)


@cache
def script(name: str) -> Script:
    """The script in ``rsaga/lua/<name>.lua``, includes expanded (cached)."""
    return Script(name, expand_includes(_read(f"{name}.lua")))


def all_scripts() -> list[Script]:
    """Every script in the package, for `rsaga check` and warm-up."""
    names = sorted(
        entry.name.removesuffix(".lua")
        for entry in resources.files("rsaga").joinpath("lua").iterdir()
        if entry.name.endswith(".lua")
    )
    return [script(name) for name in names]


SIDE_EFFECTS = ("process_index",)
"""The side effects ``commit.lua`` knows (its ``SIDE_EFFECTS`` table)."""


class SideEffect(NamedTuple):
    """A named extension of a commit, applied in the same atomic step: ``commit.lua``
    calls the Lua function registered under `name` in its ``SIDE_EFFECTS`` table with
    `keys` and `args`. The store passes it through without interpreting it."""

    name: str
    keys: Sequence[str]
    args: Sequence[EncodableArg]


class CommitStream(NamedTuple):
    """One stream of a commit: its expected version and its new (type, envelope) pairs."""

    stream_id: str
    expected: int
    events: Sequence[tuple[str, bytes]]


class ScriptCall(NamedTuple):
    """A script with the KEYS and ARGV of one call, built by `Scripts`."""

    script: Script
    keys: list[str]
    args: list[EncodableArg]

    async def run(self, redis: Redis) -> Any:
        """Run the call."""
        return await self.script(redis, self.keys, self.args)


class Scripts:
    """Every Lua script, one method each (as BullMQ's ``Scripts`` class): the method owns
    which KEYS and ARGV its script takes, so callers never build key lists."""

    def __init__(self, redis: Redis, keyspace: Keyspace) -> None:
        self.redis = redis
        self.keyspace = keyspace

    async def commit(self, shard: int, streams: Sequence[CommitStream], **effects: Any) -> Any:
        """``commit.lua`` (see `commit_call` for the arguments)."""
        return await self.commit_call(shard, streams, **effects).run(self.redis)

    def commit_call(
        self,
        shard: int,
        streams: Sequence[CommitStream],
        *,
        schedule: Sequence[tuple[str, int, bytes]] = (),
        cancel: Sequence[str] = (),
        side_effects: Sequence[SideEffect] = (),
        dead_letters: Sequence[Mapping[str, EncodableArg]] = (),
        dead_letter_max_len: int = 0,
        snapshots: Sequence[tuple[str, str, int, bytes]] = (),
        with_effects: bool = False,
    ) -> ScriptCall:
        """``commit.lua``, to run: check the versions, append the events, and
        (`with_effects`) schedule and cancel timeouts, apply side effects, add dead
        letters and store snapshots (stream id, fold, version, blob). The store runs it,
        followed by a WAIT when commits must reach replicas."""
        ks = self.keyspace
        keys = [ks.log(shard)]
        header: list[EncodableArg] = [len(streams)]
        envelopes: list[EncodableArg] = []
        for stream in streams:
            keys.append(ks.stream(stream.stream_id))
            header += [stream.stream_id, stream.expected, len(stream.events)]
            for pair in stream.events:
                envelopes += pair
        args = header + envelopes
        if with_effects:
            args.append(len(schedule))
            for timeout in schedule:
                args += timeout
            args.append(len(cancel))
            args.extend(cancel)
            if schedule or cancel:
                keys += [ks.timeouts(shard), ks.timeout_data(shard), ks.timeouts_wake(shard)]
            args.append(len(side_effects))
            for effect in side_effects:
                if effect.name not in SIDE_EFFECTS:
                    raise ValidationError(f"commit.lua has no side effect {effect.name!r}")
                args += [effect.name, len(effect.keys), len(effect.args), *effect.args]
                keys += effect.keys
            args += [len(dead_letters), dead_letter_max_len]
            for letter in dead_letters:
                args.append(2 * len(letter))
                for field, value in letter.items():
                    args += [field, value]
            if dead_letters:
                keys.append(ks.dead_letters(shard))
            args.append(len(snapshots))
            for stream_id, fold, version, blob in snapshots:
                keys.append(ks.snapshot(stream_id, fold))
                args += [version, blob]
        return ScriptCall(script("commit"), keys, args)

    async def read_streams(
        self,
        stream_ids: Sequence[str],
        page_size: int,
        from_versions: Sequence[int],
        snapshot_folds: Mapping[str, str] | None = None,
    ) -> Any:
        """``read_streams.lua``: a page of each stream from its version on; with
        `snapshot_folds` (stream id -> fold name), each stream's snapshot of that fold and
        only the events after it."""
        keys = [self.keyspace.stream(s) for s in stream_ids]
        if snapshot_folds:
            keys += [self.keyspace.snapshot(s, snapshot_folds.get(s, "")) for s in stream_ids]
        return await script("read_streams")(self.redis, keys, [page_size, *from_versions])

    def _group_keys(self, log: str, shard: int, group: str) -> list[str]:
        ks = self.keyspace
        return [
            log, ks.stream_owners(shard, group), ks.in_flight(shard, group),
            ks.handoffs(shard, group), ks.consumers_alive(shard, group),
        ]

    async def read_batch(
        self, log: str, shard: int, group: str, consumer: str, count: int,
        claim_timeout_ms: int, wanted: Collection[str] | None = None,
    ) -> Any:
        """``read_batch.lua``: entries handed over, taken over, and up to `count` new ones
        of `log` (a shard log or due stream) for `consumer` of `group`; with `wanted`,
        only entries of those event types (an empty collection: none), else every one."""
        filtered: list[EncodableArg] = ["0"] if wanted is None else ["1", *sorted(wanted)]
        return await script("read_batch")(
            self.redis, self._group_keys(log, shard, group),
            [group, consumer, count, claim_timeout_ms, *filtered],
        )

    async def ack_batch(
        self, log: str, shard: int, group: str, consumer: str, handoff_limit: int,
        entries: Sequence[tuple[str, bytes]],
    ) -> Any:
        """``ack_batch.lua``: acknowledge (entry id, stream id) pairs; take handoffs."""
        args: list[EncodableArg] = [group, consumer, handoff_limit]
        for pair in entries:
            args += pair
        return await script("ack_batch")(self.redis, self._group_keys(log, shard, group)[:4], args)

    async def dead_letter(
        self, log: str, shard: int, group: str, consumer: str, entry_id: str,
        stream_id: bytes, max_len: int, fields: Mapping[str, EncodableArg],
    ) -> Any:
        """``dead_letter.lua``: move one entry to the shard's dead letters, acknowledged."""
        keys = [*self._group_keys(log, shard, group)[:3], self.keyspace.dead_letters(shard)]
        args: list[EncodableArg] = [group, consumer, entry_id, stream_id, max_len]
        for field, value in fields.items():
            args += [field, value]
        return await script("dead_letter")(self.redis, keys, args)

    async def take_over_dead(
        self, log: str, shard: int, group: str, consumer: str, claim_timeout_ms: int
    ) -> Any:
        """``take_over_dead.lua``: take over the entries of silent consumers of `group`."""
        ks = self.keyspace
        keys = [log, ks.stream_owners(shard, group), ks.consumers_alive(shard, group),
                ks.handoffs(shard, group)]
        return await script("take_over_dead")(
            self.redis, keys, [group, consumer, claim_timeout_ms]
        )

    async def keep_alive(self, shard: int, group: str, consumer: str, *, leaving: bool) -> Any:
        """``keep_alive.lua``: renew (or, `leaving`, give up) a consumer's claim."""
        return await script("keep_alive")(
            self.redis, [self.keyspace.consumers_alive(shard, group)],
            [consumer, "gone" if leaving else "alive"],
        )

    async def move_due_timeouts(self, shard: int, batch_size: int, now_ms: int | str) -> Any:
        """``move_due_timeouts.lua``: move due timeouts onto the due stream ('' for now:
        the server's clock)."""
        ks = self.keyspace
        return await script("move_due_timeouts")(
            self.redis,
            [ks.timeouts(shard), ks.timeout_data(shard), ks.due_timeouts(shard)],
            [batch_size, now_ms],
        )

    async def remove_expired(
        self, shard: int, process_type: str, candidates: Sequence[tuple[str, bytes]],
        now_ms: int | str, snapshot_fold: str,
    ) -> Any:
        """``remove_expired.lua``: remove the (stream id, tombstone envelope) candidates of
        `process_type` whose retention passed ('' for now: the server's clock), and their
        snapshots of `snapshot_fold`."""
        ks = self.keyspace
        keys = ks.process_index(shard, process_type) + [ks.stream(s) for s, _ in candidates]
        keys += [ks.snapshot(s, snapshot_fold) for s, _ in candidates]
        args: list[EncodableArg] = [now_ms]
        for pair in candidates:
            args += pair
        return await script("remove_expired")(self.redis, keys, args)

    async def trim_log(self, log: str, retention_ms: int) -> Any:
        """``trim_log.lua``: trim what every group acknowledged longer ago than retention."""
        return await script("trim_log")(self.redis, [log], [retention_ms])

    async def replay_dead_letter(self, shard: int, dead_letter_id: str) -> Any:
        """``replay_dead_letter.lua``: put a dead letter back for its group."""
        ks = self.keyspace
        return await script("replay_dead_letter")(
            self.redis,
            [ks.dead_letters(shard), ks.log(shard), ks.due_timeouts(shard)],
            [dead_letter_id],
        )
