"""What a Redis ACL user needs to run rsaga, and a check that runs nothing.

Every command rsaga sends, or its Lua scripts call, is queued inside
``MULTI`` on the keys rsaga really uses and then thrown away with
``DISCARD``: Redis checks the user's permissions (command and keys) when it
queues a command, so a denied one answers ``NOPERM`` at once and an allowed
one runs never. One round trip, nothing written.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from rsaga.cluster import as_cluster, is_cluster, replies_of
from rsaga.errors import RsagaError
from rsaga.keyspace import Keyspace

TRANSACTION = ("exec", "multi", "discard")
"""Checked outside a transaction (``EXEC`` alone is refused, or says "without MULTI");
rsaga's dead-letter moves use ``MULTI``/``EXEC``, the check ``MULTI``/``DISCARD``."""


class MissingPermissions(RsagaError):
    """The Redis user may not run some command rsaga needs, or not on rsaga's keys."""

    def __init__(self, missing: list[str], prefix: str) -> None:
        super().__init__(
            f"the Redis user lacks {len(missing)} permission(s) rsaga needs: "
            + "; ".join(missing)
            + f" (`rsaga check` lists them; grant: ACL SETUSER <user> {minimal_acl(prefix)})"
        )
        self.missing = missing


def probes(keyspace: Keyspace) -> list[tuple[str, ...]]:
    """One harmless invocation of every command rsaga uses, on rsaga's own keys.

    Harmless because it is only ever queued in a transaction that is discarded.
    """
    log = keyspace.log(0)
    hash_key = keyspace.in_flight(0, "rsaga-check")
    zset = keyspace.timeouts(0)
    durations = keyspace.process_durations(0, "rsaga-check")
    heartbeat = keyspace.heartbeat("rsaga-check")
    types = keyspace.process_types(0)
    return [
        ("PING",),
        ("TIME",),
        ("SCAN", "0", "MATCH", f"{keyspace.prefix}:*", "COUNT", "1"),
        ("SCRIPT", "LOAD", "return 1"),
        ("EVALSHA", "0" * 40, "1", log),
        ("EVAL", "return 1", "1", log),
        ("WAIT", "0", "0"),
        # A Redis Cluster client reads the slot map and the command table, and
        # follows ASK redirects.
        ("CLUSTER", "SLOTS"),
        ("COMMAND", "COUNT"),
        ("ASKING",),
        ("GET", heartbeat),
        ("SET", heartbeat, "1", "PX", "1000"),
        ("DEL", heartbeat),
        ("EXISTS", log),
        ("HGET", hash_key, "f"),
        ("HMGET", hash_key, "f"),
        ("HGETALL", hash_key),
        ("HSET", hash_key, "f", "1"),
        ("HDEL", hash_key, "f"),
        ("HINCRBY", hash_key, "f", "1"),
        ("LPUSH", durations, "1"),
        ("LTRIM", durations, "0", "1"),
        ("LRANGE", durations, "0", "-1"),
        ("ZADD", zset, "1", "m"),
        ("ZREM", zset, "m"),
        ("ZRANGE", zset, "0", "1"),
        ("ZRANGEBYSCORE", zset, "0", "1"),
        ("ZREVRANGE", zset, "0", "1"),
        ("ZCOUNT", zset, "0", "1"),
        ("ZCARD", zset),
        ("ZREMRANGEBYRANK", zset, "0", "1"),
        ("ZREMRANGEBYSCORE", zset, "0", "1"),
        ("ZREVRANGEBYSCORE", zset, "1", "0"),
        ("ZRANGEBYLEX", zset, "-", "+"),
        ("ZSCORE", zset, "m"),
        ("SADD", types, "t"),
        ("SMEMBERS", types),
        ("MGET", heartbeat),
        ("XADD", log, "NOMKSTREAM", "*", "f", "1"),
        ("XLEN", log),
        ("XRANGE", log, "-", "+", "COUNT", "1"),
        ("XREVRANGE", log, "+", "-", "COUNT", "1"),
        ("XREAD", "COUNT", "1", "STREAMS", log, "0"),
        ("XDEL", log, "0-1"),
        ("XTRIM", log, "MAXLEN", "0"),
        ("XGROUP", "CREATE", log, "rsaga-check", "$", "MKSTREAM"),
        ("XGROUP", "DELCONSUMER", log, "rsaga-check", "rsaga-check"),
        ("XREADGROUP", "GROUP", "rsaga-check", "c", "COUNT", "1", "STREAMS", log, ">"),
        ("XACK", log, "rsaga-check", "0-1"),
        ("XCLAIM", log, "rsaga-check", "c", "0", "0-1"),
        ("XPENDING", log, "rsaga-check"),
        ("XINFO", "GROUPS", log),
    ]


_SUBCOMMANDS = {"SCRIPT", "XGROUP", "XINFO", "CLUSTER"}


def _acl_name(probe: tuple[str, ...]) -> str:
    """``xadd``, or ``xgroup|create`` for a command with subcommands (ACL rule syntax)."""
    if probe[0] in _SUBCOMMANDS:
        return f"{probe[0]}|{probe[1]}".lower()
    return probe[0].lower()


def minimal_acl(prefix: str) -> str:
    """The narrowest ACL rules that let rsaga run under `prefix` (for ``ACL SETUSER``)."""
    names = dict.fromkeys(_acl_name(probe) for probe in probes(Keyspace(prefix=prefix)))
    commands = " ".join(f"+{name}" for name in [*names, *TRANSACTION])
    return f"resetkeys ~{prefix}:* resetchannels -@all {commands}"


async def missing_permissions(redis: Redis, keyspace: Keyspace) -> list[str]:
    """One line per permission the connected user lacks (empty: it has all rsaga needs).

    On a Redis Cluster every master is asked (ACL users are per node), and each
    line names the node.
    """
    if not is_cluster(redis):
        pool = redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            return await _missing_on(connection, keyspace)
        finally:
            await pool.release(connection)
    cluster = as_cluster(redis)
    await cluster.initialize()
    missing: list[str] = []
    for node in cluster.get_primaries():
        connection = node.acquire_connection()
        try:
            missing += [f"{node.name}: {line}" for line in await _missing_on(connection, keyspace)]
        finally:
            node.release(connection)
    return missing


async def _missing_on(connection: Any, keyspace: Keyspace) -> list[str]:
    try:
        # EXEC outside a transaction runs nothing; MULTI must be known to
        # work before anything else is sent, or the probes would really run.
        exec_reply, multi_reply = await replies_of(connection, [("EXEC",), ("MULTI",)])
        denied = [
            _not_allowed(name)
            for name, reply in (("exec", exec_reply), ("multi", multi_reply))
            if _denied(reply)
        ]
        if isinstance(multi_reply, ResponseError):
            return denied
        queued = probes(keyspace)
        *replies, discard_reply = await replies_of(connection, [*queued, ("DISCARD",)])
    except BaseException:
        await connection.disconnect()  # replies may be left unread: never reuse it
        raise
    if isinstance(discard_reply, ResponseError):
        raise ResponseError(f"DISCARD after the permission probes: {discard_reply}")
    return denied + _describe(queued, replies)


def _denied(reply: object) -> bool:
    # EXEC outside a transaction reports NOPERM inside an EXECABORT error.
    return isinstance(reply, NoPermissionError) or (
        isinstance(reply, ResponseError) and "NOPERM" in str(reply)
    )


def _describe(queued: list[tuple[str, ...]], replies: list[object]) -> list[str]:
    commands: list[str] = []
    keys: dict[str, list[str]] = {}
    for probe, reply in zip(queued, replies, strict=True):
        if not _denied(reply):
            continue
        name = _acl_name(probe)
        if "access one of the keys" in str(reply):
            keys.setdefault(_key_of(probe), []).append(name.upper())
        else:
            commands.append(_not_allowed(name))
    return commands + [
        f"key {key}: not accessible to {', '.join(names)} (grant ~{key.split(':')[0]}:*)"
        for key, names in keys.items()
    ]


def _not_allowed(name: str) -> str:
    return f"command {name.upper()}: not allowed (grant +{name})"


def _key_of(probe: tuple[str, ...]) -> str:
    return next(arg for arg in probe if ":" in arg and not arg.endswith(":*"))
