"""Redis clients: a real server from a URL, or embedded fakeredis for the demo and tests."""

from __future__ import annotations

from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from rsaga.config import RedisSettings, redact_url
from rsaga.errors import ConfigError, RedisUnavailable


def connect(settings: RedisSettings) -> Redis:
    """A client for ``settings.url`` (TLS for ``rediss://``; ACL user and password from it).

    Connection errors are retried briefly by redis-py itself; longer outages
    surface as `RedisUnavailable` from the store and are handled by the caller.
    """
    if not settings.url:
        raise ConfigError("redis.url: no Redis configured (set RSAGA_REDIS_URL)")
    try:
        # A plain pool (a blocking one costs ~20% per round trip, measured);
        # max_connections is a ceiling, connections are opened as needed.
        pool = ConnectionPool.from_url(
            settings.url,
            decode_responses=False,
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=settings.socket_timeout,
            max_connections=settings.max_connections,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), retries=3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
    except ValueError as exc:
        raise ConfigError(f"redis.url: {exc} ({redact_url(settings.url)})") from None
    return Redis(connection_pool=pool)


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


async def ping(redis: Redis, where: str) -> dict[str, Any]:
    """PING and INFO server, or `RedisUnavailable` naming `where` (without password)."""
    try:
        await redis.ping()
        info: dict[str, Any] = await redis.info("server")
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise RedisUnavailable(f"cannot reach Redis at {where}: {exc}") from exc
    return info
