"""Redis clients: a real server from a URL, or embedded fakeredis for the demo and tests."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, NamedTuple, cast

import anyio
from redis.asyncio import ConnectionPool, Redis, SSLConnection
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import RedisClusterException, ResponseError

from rsaga.cluster import ClusterClient, as_cluster, client_options, is_cluster
from rsaga.config import RedisAddress, RedisSettings, parse_redis_url, redact_url
from rsaga.errors import ConfigError, RedisUnavailable
from rsaga.keyspace import Keyspace
from rsaga.permissions import MissingPermissions, missing_permissions
from rsaga.runtime.liveness import redis_down

log = logging.getLogger("rsaga.connection")

NO_RESEND = Retry(NoBackoff(), retries=0)
"""The client's retry policy: one attempt per command, never a re-send (see `connect`)."""


def connect(settings: RedisSettings) -> Redis:
    """A client for ``settings.url`` (TLS for ``rediss://``), with the configured credentials.

    redis-py never re-sends a command: when a connection drops after a command
    was sent, nobody can know whether it ran, and re-sending a script would
    apply a command without an idempotency key twice, or strand the entries of
    a lost group read. Connection errors reach the caller, which decides:
    commands are retried by their handler (expected versions and idempotency
    keys make that safe), a worker resyncs its pending entries before it reads
    again, and outages are waited out with backoff (see docs/design.md).

    With ``redis.cluster`` the URL names one node of a Redis Cluster and the
    client is redis-py's asyncio `RedisCluster` (typed as `Redis`: it has the same
    commands) with the same options, per node. It follows MOVED and ASK itself;
    on a connection error it raises, like the single-node client, and reads the
    slot map again before its next command, so a failover is waited out by the
    same backoff as an outage.
    """
    if not settings.url:
        raise ConfigError("redis.url: no Redis configured (set RSAGA_REDIS_URL)")
    # Only the credential-free address is ever parsed by redis-py, so no
    # error it raises can quote the password.
    target = parse_redis_url(settings.url)
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_timeout,
        "max_connections": settings.max_connections,
        "health_check_interval": 30,
        "retry": NO_RESEND,
        **_credentials(settings, target),
        **_tls_files(settings),
    }
    try:
        if settings.cluster:
            # reinitialize_steps=0: a MOVED patches the slot map; redis-py's periodic full
            # refresh closes every connection, replies in flight on other tasks included.
            client = ClusterClient.from_url(target.address, reinitialize_steps=0, **options)
            return cast(Redis, client)
        # A plain pool (a blocking one costs ~20% per round trip, measured);
        # max_connections is a ceiling, connections are opened as needed.
        pool = ConnectionPool.from_url(target.address, **options)
    except (ValueError, RedisClusterException) as exc:
        raise ConfigError(f"redis.url: {exc} ({redact_url(settings.url)})") from None
    pool.connection_class = packing_fast(pool.connection_class)
    return Redis(connection_pool=pool)


_FAST_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def packing_fast(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class` (plain, TLS or Unix socket) with a faster `pack_command`.

    A commit is one EVALSHA of 50-100 arguments; redis-py encodes each through a
    generic encoder and builds the message in chunks (~40 us for 70 arguments),
    this joins bytes, str and int arguments at once (~15 us). Anything else
    (floats, memoryviews, a command name of two words) is packed by redis-py.
    """
    fast = _FAST_PACKING.get(connection_class)
    if fast is None:
        general = connection_class.pack_command

        def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
            first = args[0] if args else None
            if type(first) is not str or " " in first:
                return general(self, *args)
            encoding = self.encoder.encoding
            errors = self.encoder.encoding_errors
            parts = [b"*%d\r\n" % len(args)]
            for arg in args:
                kind = type(arg)
                if kind is bytes:
                    data = arg
                elif kind is str:
                    data = arg.encode(encoding, errors)
                elif kind is int:
                    data = b"%d" % arg
                else:
                    return general(self, *args)
                parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
            return [b"".join(parts)]

        fast = _FAST_PACKING[connection_class] = type(
            connection_class.__name__, (connection_class,), {"pack_command": pack_command}
        )
    return fast


class PasswordFile(CredentialProvider):
    """Credentials whose password is read from a file at every new connection,
    so a rotated secret is picked up without a restart."""

    def __init__(self, username: str | None, path: str) -> None:
        self.username = username
        self.path = Path(path)

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        """(password,) or (username, password), the password read from the file now."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RedisAuthenticationError(
                f"redis.password_file: cannot read {self.path}: {exc.strerror}"
            ) from None
        password = text.removesuffix("\n").removesuffix("\r")
        return (self.username, password) if self.username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        """As `get_credentials` (a small local file: reading it does not block for long)."""
        return self.get_credentials()


def _credentials(settings: RedisSettings, target: RedisAddress) -> dict[str, Any]:
    username = settings.username or target.username
    if settings.password_file:
        return {"credential_provider": PasswordFile(username, settings.password_file)}
    return {"username": username, "password": settings.password or target.password}


def _tls_files(settings: RedisSettings) -> dict[str, Any]:
    files = {
        "ssl_ca_certs": settings.tls_ca,
        "ssl_certfile": settings.tls_cert,
        "ssl_keyfile": settings.tls_key,
    }
    return {option: path for option, path in files.items() if path}


def embedded() -> Redis:
    """An in-process fakeredis server with Lua (needs the ``embedded`` extra)."""
    try:
        import fakeredis
    except ImportError:
        raise ConfigError(
            "embedded mode needs fakeredis: pip install 'rsaga[embedded]'"
        ) from None
    client: Any = fakeredis.FakeAsyncRedis(decode_responses=False)
    return client  # type: ignore[no-any-return]


class ServerInfo(NamedTuple):
    """What a Redis server says about itself ("?" where it would not say)."""

    version: str
    mode: str


async def server_info(redis: Redis) -> ServerInfo:
    """Version and mode from ``HELLO`` (allowed to every ACL user), else ``INFO server``
    (on a cluster, of one node)."""
    one_node: dict[str, Any] = {}
    if is_cluster(redis):
        cluster = await as_cluster(redis).initialize()
        one_node["target_nodes"] = cluster.get_default_node()
    try:
        reply: Any = await redis.execute_command("HELLO", **one_node)  # type: ignore[no-untyped-call]
    except ResponseError:
        try:
            info: dict[str, Any] = await redis.info("server", **one_node)
        except ResponseError:  # INFO is @dangerous: a restricted user may not run it
            return ServerInfo("?", "?")
        return ServerInfo(str(info.get("redis_version", "?")), str(info.get("redis_mode", "?")))
    if isinstance(reply, list):  # RESP2 servers (and fakeredis) answer a flat list
        reply = dict(zip(reply[::2], reply[1::2], strict=True))
    fields = {_text(key): _text(value) for key, value in reply.items()}
    return ServerInfo(fields.get("version", "?"), fields.get("mode", "?"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def ping(
    redis: Redis, where: str, *, wait: float = 0.0, keyspace: Keyspace | None = None
) -> ServerInfo:
    """PING Redis (waiting up to `wait` seconds for it to come up) and say what it is.

    While it is unreachable (refused, timed out, loading) a warning is logged
    every few seconds; then `RedisUnavailable` names `where` (never a
    password). Refused credentials fail at once: waiting will not fix them.
    With `keyspace`, the user's ACL permissions on it are checked too
    (`MissingPermissions`, one line).
    """
    return await _reachable(redis, where, wait, keyspace)


async def _reachable(
    redis: Redis, where: str, wait: float, keyspace: Keyspace | None
) -> ServerInfo:
    deadline = time.monotonic() + wait
    next_log = time.monotonic()
    delay = 0.1
    while True:
        try:
            await redis.ping()
            info = await server_info(redis)
            if keyspace is not None:
                # Inside the wait: a cluster master failing over while this process
                # starts is waited out like an outage.
                missing = await missing_permissions(redis, keyspace)
                if missing:
                    raise MissingPermissions(missing, keyspace.prefix)
            return info
        except RedisAuthenticationError as exc:
            # The cause tells the CLI this is a configuration problem (exit 2), not an outage.
            raise RedisUnavailable(f"Redis at {where} refused the credentials: {exc}") from exc
        except Exception as exc:
            if not redis_down(exc):
                raise
            mistake = _tls_mistake(redis, exc)
            if mistake:
                raise RedisUnavailable(f"cannot use Redis at {where}: {mistake}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" (waited {wait:g} s)" if wait else ""
                raise RedisUnavailable(f"cannot reach Redis at {where}{waited}: {exc}") from exc
            if time.monotonic() >= next_log:
                log.warning("waiting for Redis at %s (%.0f s left): %s", where, left, exc)
                next_log = time.monotonic() + LOG_EVERY
            await anyio.sleep(min(delay, left))
            delay = min(delay * 2, 1.0)


LOG_EVERY = 5.0
"""Seconds between log lines while a starting process waits for Redis."""


def _tls_mistake(redis: Redis, exc: BaseException) -> str | None:
    """What is wrong with the TLS settings, if `exc` says so (waiting will not fix it).

    A server that requires a client certificate checks it after the handshake
    (TLS 1.3) and just drops a client without one, which redis-py reports as
    a reset connection: say what that means.
    """
    kwargs = client_options(redis)
    if not issubclass(kwargs.get("connection_class", type(None)), SSLConnection):
        return None
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        hint = "" if kwargs.get("ssl_ca_certs") else "; set redis.tls_ca to the CA that signed it"
        return f"the server's certificate is not trusted{hint} ({text})"
    dropped = any(
        sign in text.lower()
        for sign in ("reset by peer", "closed by server", "certificate required")
    )
    if dropped and not kwargs.get("ssl_certfile"):
        return (
            "the server closed the TLS connection: it requires a client certificate; "
            f"set redis.tls_cert and redis.tls_key ({text})"
        )
    return None
