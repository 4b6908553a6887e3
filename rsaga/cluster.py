"""Redis Cluster: the client, what its routing cannot do alone, and where the shards live.

Every key of a shard carries the shard as a hash tag (``rsaga:{3}:...``), so each
script and each multi-key command of a shard touches one slot and redis-py's
`RedisCluster` routes it to the slot's master. What it cannot route alone is
here: reads of unsharded keys spread over slots (`mget`), a commit that must
wait for replicas on the very connection that wrote it (`run_replicated`), a
blocking reader's own client (`side_client`), and the layout `rsaga check`
prints. The shard count is stored in Redis on first use (`ensure_shard_count`):
changing it remaps streams, so a deployment that disagrees refuses to start.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, MovedError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rsaga.errors import ConfigError, RedisUnavailable
from rsaga.keyspace import Keyspace
from rsaga.scripts import EncodableArg, Script

REDIRECTS = 5
"""MOVED/ASK answers a replicated commit follows before it gives up (a slot moving twice
in one call means the cluster is being resharded hard: the caller retries later)."""


class ClusterClient(RedisCluster):
    """redis-py's asyncio `RedisCluster`, remembering how it was built (see `sibling`)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.options = options

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """As `RedisCluster.execute_command`, but the first commands wait for the slot map
        together (redis-py's lazy discovery races when many start at once on a new
        client), and a connection closed under a command by another task's refresh of
        the slot map is a connection error (redis-py lets it out as AttributeError)."""
        if self._initialize:
            await self.initialize()
        try:
            return await super().execute_command(*args, **kwargs)
        except AttributeError as exc:
            if "NoneType" not in str(exc):
                raise
            raise RedisConnectionError(f"connection closed while in use: {exc}") from exc

    async def _determine_slot(self, command: str, *args: Any) -> int:
        """The slot of a command; for XREAD and XREADGROUP computed here, where redis-py
        would first ask a node (``COMMAND GETKEYS``: a round trip before every read)."""
        if str(command).upper() in ("XREAD", "XREADGROUP"):
            words = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
            if "STREAMS" in (upper := [w.upper() for w in words]):
                rest = args[upper.index("STREAMS") + 1 :]
                slots = {self.keyslot(key) for key in rest[: len(rest) // 2]}
                if len(slots) == 1:
                    return slots.pop()
        return await super()._determine_slot(command, *args)

    def sibling(self, max_connections: int) -> ClusterClient:
        """A new client to the same cluster with the same options and a smaller pool."""
        return ClusterClient(**{**self.options, "max_connections": max_connections})


def is_cluster(redis: Any) -> bool:
    """Whether `redis` is a Redis Cluster client."""
    return isinstance(redis, RedisCluster)


def as_cluster(redis: Any) -> RedisCluster:
    """`redis` as the cluster client it is (callers check `is_cluster` first)."""
    return cast(RedisCluster, redis)


def client_options(redis: Any) -> dict[str, Any]:
    """The connection options of a client (timeouts, TLS, credentials, and the
    connection class), either kind."""
    if is_cluster(redis):
        return dict(as_cluster(redis).connection_kwargs)
    pool = redis.connection_pool
    return {**pool.connection_kwargs, "connection_class": pool.connection_class}


def side_client(redis: Redis, max_connections: int) -> Redis:
    """A client of its own to the same Redis, for blocking reads that must not hold the
    shared pool's connections."""
    if isinstance(redis, ClusterClient):
        return cast(Redis, redis.sibling(max_connections))
    pool = redis.connection_pool
    return Redis(
        connection_pool=ConnectionPool(
            connection_class=pool.connection_class,
            max_connections=max_connections,
            **pool.connection_kwargs,
        )
    )


async def mget(redis: Redis, keys: Sequence[str]) -> list[Any]:
    """GET of every key, in order, in one round trip per node (keys may be in any slot)."""
    if is_cluster(redis):
        return list(await as_cluster(redis).mget_nonatomic(list(keys)))
    return list(await redis.mget(list(keys)))


# --- the stored shard count ------------------------------------------------------------


async def ensure_shard_count(redis: Redis, keyspace: Keyspace) -> None:
    """Store the shard count on first use; `ConfigError` if Redis holds another one.

    A stream's shard is ``crc32(id) % shards``: with another count every stream
    would be looked for in the wrong shard, so this is a migration, not a setting.
    """
    key = keyspace.shard_count()
    if await redis.set(key, keyspace.shards, nx=True):
        return
    stored: Any = await redis.get(key)
    if stored is not None and int(stored) != keyspace.shards:
        raise ConfigError(
            f"store.shards is {keyspace.shards} but the keyspace {keyspace.prefix!r} in Redis "
            f"has {int(stored)} shards: changing the count moves every stream to another "
            "shard, which is a migration, not a setting to flip (see docs/scaling.md); "
            f"set store.shards = {int(stored)}"
        )


def one_shard_warning(redis: Redis, keyspace: Keyspace) -> str | None:
    """The warning for a cluster given one shard (all of rsaga on one master), if so."""
    if is_cluster(redis) and keyspace.shards == 1:
        return (
            "store.shards is 1 on a Redis Cluster: every key of rsaga lands on one master "
            "and the others stay idle; a new deployment should set store.shards to a few "
            "times the number of masters (changing it later is a migration)"
        )
    return None


def parse_shards(text: str, shards: int) -> list[int]:
    """Shard numbers from ``"0-3,6"`` (ranges inclusive); `ValueError` naming the problem."""
    chosen: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(
                f"--shards: {part.strip()!r} is not a shard or a range like 0-7"
            ) from None
        if not 0 <= low <= high < shards:
            raise ValueError(
                f"--shards: {part.strip()!r} is outside 0-{shards - 1} (store.shards is {shards})"
            )
        chosen.update(range(low, high + 1))
    return sorted(chosen)


# --- where the shards live -------------------------------------------------------------


class Master(NamedTuple):
    """One master of a cluster: its address, slot count, replicas and rsaga shards."""

    name: str
    slots: int
    replicas: int
    shards: list[int]


async def cluster_layout(redis: Redis, keyspace: Keyspace) -> list[Master]:
    """Every master with the shards of `keyspace` it holds, from the client's slot map."""
    cluster = as_cluster(redis)
    await cluster.initialize()
    slots: dict[str, int] = {}
    replicas: dict[str, int] = {}
    for nodes in cluster.nodes_manager.slots_cache.values():
        primary = nodes[0].name
        slots[primary] = slots.get(primary, 0) + 1
        replicas[primary] = max(replicas.get(primary, 0), len(nodes) - 1)
    shards: dict[str, list[int]] = {}
    for shard in range(keyspace.shards):
        node = cluster.get_node_from_key(keyspace.log(shard))
        shards.setdefault(node.name if node else "?", []).append(shard)
    names = sorted({n.name for n in cluster.get_primaries()} | set(slots))
    return [Master(n, slots.get(n, 0), replicas.get(n, 0), shards.get(n, [])) for n in names]


# --- commits that wait for replicas --------------------------------------------------------


async def run_replicated(
    redis: Redis,
    script: Script,
    keys: Sequence[str],
    args: Sequence[EncodableArg],
    replicas: int,
    timeout_ms: int,
) -> tuple[Any, int]:
    """Run `script`, then ``WAIT replicas timeout_ms`` on the same connection, in one
    round trip; returns the script's reply and how many replicas acknowledged it.

    WAIT counts the replicas that have every write of *its connection*, so it
    must follow the script on the connection that ran it: this sends both on one
    connection of the node that owns the keys' slot, following MOVED and ASK
    itself (on a redirect the script did not run) and sending the source on
    NOSCRIPT. A connection error leaves the outcome unknown: it is raised.
    """
    evaluate: tuple[EncodableArg, ...] = ("EVALSHA", script.sha)
    asking: str | None = None
    for _ in range(REDIRECTS):
        call = (*evaluate, len(keys), *keys, *args)
        commands: list[tuple[EncodableArg, ...]] = [call, ("WAIT", replicas, timeout_ms)]
        if asking is not None:
            commands.insert(0, ("ASKING",))
        async with _connection(redis, keys[0], asking) as connection:
            replies = await replies_of(connection, commands)
        reply, acked = replies[-2], replies[-1]
        asking = None
        if isinstance(reply, NoScriptError):
            evaluate = ("EVAL", script.source)
        elif isinstance(reply, MovedError):
            await _refresh(redis)
        elif isinstance(reply, AskError):
            asking = f"{reply.host}:{reply.port}"
        elif isinstance(reply, Exception):
            raise reply
        else:
            if isinstance(acked, Exception):
                raise acked
            return reply, int(acked)
    raise RedisUnavailable(f"{script.name}: the slot of {keys[0]} kept moving; try again")


@contextlib.asynccontextmanager
async def _connection(redis: Redis, key: str, node_name: str | None) -> AsyncIterator[Any]:
    """A connection to the master of `key`'s slot (or to `node_name`), given back after."""
    if not is_cluster(redis):
        pool = redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            yield connection
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        return
    cluster = as_cluster(redis)
    await cluster.initialize()
    node: ClusterNode | None = (
        cluster.get_node(node_name=node_name) if node_name else cluster.get_node_from_key(key)
    )
    if node is None:  # an ASK to a node the slot map does not know yet
        await _refresh(redis)
        node = cluster.get_node(node_name=node_name) or cluster.get_node_from_key(key)
    if node is None:
        raise RedisUnavailable(f"no master serves the slot of {key} now")
    connection = node.acquire_connection()
    try:
        yield connection
    except (RedisConnectionError, RedisTimeoutError, OSError):
        await connection.disconnect()
        await _refresh(redis)  # the master may have failed over: ask the cluster again
        raise
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        node.release(connection)


async def replies_of(connection: Any, commands: Sequence[tuple[EncodableArg, ...]]) -> list[Any]:
    """Send `commands` on `connection` in one round trip; their replies, errors
    (`ResponseError`) as values."""
    await connection.send_packed_command(connection.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


async def _refresh(redis: Redis) -> None:
    """Make the cluster client read the slot map again before its next command."""
    if is_cluster(redis):
        cluster = as_cluster(redis)
        cluster._initialize = True  # what redis-py itself sets after a connection error
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            await cluster.initialize()
