"""Settings: ``config/rsaga.toml`` decoded with msgspec, overridden by ``RSAGA_*`` variables.

Unknown keys are errors (a typo must not be silently ignored). Every error is
one `ConfigError` line naming the key and the problem; the CLI exits 2 on it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from rsaga.errors import ConfigError
from rsaga.events import DEFAULT_MAX_EVENT_BYTES
from rsaga.executor import DEFAULT_COMMAND_RETRY
from rsaga.retry import RetryPolicy
from rsaga.store import DEFAULT_PAGE_SIZE

DEFAULT_CONFIG_PATH = Path("config/rsaga.toml")


class RedisSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to reach Redis."""

    url: str = ""
    """``redis://[user:password@]host:port/db`` or ``rediss://`` for TLS; empty: none."""
    socket_timeout: float = 5.0
    """Seconds before a Redis call without a blocking timeout gives up."""
    max_connections: int = 1000
    """Ceiling on the connection pool of one process (connections open as needed)."""

    def __post_init__(self) -> None:
        if self.url:
            parts = urlsplit(self.url)
            if parts.scheme not in ("redis", "rediss", "unix"):
                raise ValueError(
                    f"url: scheme must be redis://, rediss:// or unix://, "
                    f"got {redact_url(self.url)!r}"
                )
        if self.socket_timeout <= 0:
            raise ValueError(f"socket_timeout: must be > 0, got {self.socket_timeout}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections: must be >= 1, got {self.max_connections}")


class StoreSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The keyspace and event store."""

    prefix: str = "rsaga"
    """Prefix of every key."""
    shards: int = 1
    """Number of shards; each stream id maps to one. Changing it remaps streams."""
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    """Largest encoded event accepted."""
    read_page_size: int = DEFAULT_PAGE_SIZE
    """Events per XRANGE page when reading a stream."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,50}", self.prefix):
            raise ValueError(f"prefix: must be 1-50 of [A-Za-z0-9._-], got {self.prefix!r}")
        for name in ("shards", "max_event_bytes", "read_page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


class ExecutorSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The command executor."""

    retry: RetryPolicy = DEFAULT_COMMAND_RETRY
    """Retry policy on version conflicts."""


class WorkerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`rsaga worker` processes."""

    handlers: list[str] = msgspec.field(default_factory=list)
    """Handlers to load by import path (``package.module:Class``), besides entry points."""
    concurrency: int = 32
    """Events handled at once by one worker process (over all handlers and streams)."""
    batch_size: int = 100
    """Entries read from a shard log per round trip."""
    block_ms: int = 2000
    """How long an idle read waits for new entries (must stay below socket_timeout)."""
    start: str = "beginning"
    """Where a new consumer group starts: "beginning" of the log or "new" events only."""
    shutdown_timeout: float = 25.0
    """Seconds in-flight handlers get to finish after SIGTERM or SIGINT."""
    heartbeat_ttl: float = 15.0
    """Seconds a worker's heartbeat lives unless renewed."""
    claim_timeout: float | None = None
    """Seconds a silent worker keeps its entries before others take over; None: each
    handler's own `claim_timeout`."""
    max_deliveries: int = 5
    """Deliveries without acknowledgement (crashes) before an entry goes to dead letters."""
    dead_letter_max_len: int = 100_000
    """Dead letters kept per shard (oldest trimmed first, approximately)."""
    log_retention: float = 3600.0
    """Seconds acknowledged entries stay on the shard log before trimming."""
    trim_interval: float = 30.0
    """Seconds between trims of the shard logs."""

    def __post_init__(self) -> None:
        if self.start not in ("beginning", "new"):
            raise ValueError(f"start: must be 'beginning' or 'new', got {self.start!r}")
        for name in ("concurrency", "batch_size", "block_ms", "max_deliveries",
                     "dead_letter_max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.claim_timeout is not None and self.claim_timeout <= 0:
            raise ValueError(f"claim_timeout: must be > 0, got {self.claim_timeout}")
        for name in ("shutdown_timeout", "heartbeat_ttl", "log_retention", "trim_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


class SchedulerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`rsaga scheduler` processes."""

    batch_size: int = 1000
    """Due timeouts moved per atomic script call."""
    max_sleep: float = 5.0
    """Longest sleep with nothing due (it is woken early when something is scheduled)."""
    heartbeat_ttl: float = 15.0
    """Seconds a scheduler's heartbeat lives unless renewed."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        for name in ("max_sleep", "heartbeat_ttl"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


class HealthSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Thresholds of `rsaga health` (warning: exit 1, critical: exit 2)."""

    stuck_after: float = 3600.0
    """Seconds without progress after which an active process counts as stuck (warning)."""
    overdue_after: float = 60.0
    """Seconds past due after which an unmoved timeout is overdue (critical)."""
    lag_warning: int = 1000
    """Undelivered entries of a consumer group that make a warning."""
    lag_critical: int = 100_000
    """Undelivered entries of a consumer group that make it critical."""
    dead_letters_warning: int = 1
    """Dead letters that make a warning."""
    failure_rate_warning: float = 0.5
    """Share of failed processes (of a type) that makes a warning..."""
    min_finished: int = 20
    """...once at least this many processes of the type have finished."""
    average_duration_warning: float = 0.0
    """Mean duration (s) of the last 1,000 finished processes of a type above which to warn;
    0: off. A process type overrides it with its `average_duration_warning` attribute."""
    max_process_age: float = 0.0
    """Age (s, from its start) above which an active process makes a warning; 0: off.
    A process type overrides it with its `max_process_age` attribute."""
    max_retry_count: int = 0
    """Retries of an active process's current step from which it makes a warning; 0: off.
    A process type overrides it with its `max_retry_count` attribute."""

    def __post_init__(self) -> None:
        for name in ("average_duration_warning", "max_process_age", "max_retry_count"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0 (0: off), got {getattr(self, name)}")


class LoggingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Logs of every rsaga command."""

    format: str = "kv"
    """"kv" (key=value) or "json" (one object per line)."""
    level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""

    def __post_init__(self) -> None:
        if self.format not in ("kv", "json"):
            raise ValueError(f"format: must be 'kv' or 'json', got {self.format!r}")
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"level: must be DEBUG, INFO, WARNING or ERROR, got {self.level!r}")


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """All of rsaga's settings."""

    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    executor: ExecutorSettings = msgspec.field(default_factory=ExecutorSettings)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    scheduler: SchedulerSettings = msgspec.field(default_factory=SchedulerSettings)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)

    def __post_init__(self) -> None:
        if self.worker.block_ms >= self.redis.socket_timeout * 1000:
            raise ValueError(
                f"worker.block_ms: must stay below redis.socket_timeout "
                f"({self.redis.socket_timeout:g}s), got {self.worker.block_ms} ms"
            )


ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "RSAGA_REDIS_URL": ("redis", "url"),
    "RSAGA_REDIS_SOCKET_TIMEOUT": ("redis", "socket_timeout"),
    "RSAGA_REDIS_MAX_CONNECTIONS": ("redis", "max_connections"),
    "RSAGA_PREFIX": ("store", "prefix"),
    "RSAGA_SHARDS": ("store", "shards"),
    "RSAGA_MAX_EVENT_BYTES": ("store", "max_event_bytes"),
    "RSAGA_HANDLERS": ("worker", "handlers"),
    "RSAGA_CONCURRENCY": ("worker", "concurrency"),
    "RSAGA_SHUTDOWN_TIMEOUT": ("worker", "shutdown_timeout"),
    "RSAGA_CLAIM_TIMEOUT": ("worker", "claim_timeout"),
    "RSAGA_STUCK_AFTER": ("health", "stuck_after"),
    "RSAGA_LOG_FORMAT": ("logging", "format"),
    "RSAGA_LOG_LEVEL": ("logging", "level"),
}
"""Environment variables and the setting each overrides."""


def redact_url(url: str) -> str:
    """`url` with its password (in the user part or the query) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    if "password=" in parts.query:
        parts = parts._replace(query=re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query))
    return urlunsplit(parts)


_AT_PATH = re.compile(r"^(.*) - at `\$\.?(.*)`$")


def _one_line(exc: msgspec.ValidationError, source: str, from_env: dict[str, str]) -> str:
    text = str(exc).splitlines()[0]
    match = _AT_PATH.match(text)
    if not match:
        return f"{source}: {text}"
    problem, path = match.groups()
    # __post_init__ checks say "field: problem"; make that the dotted key.
    field = re.match(r"^([a-z_.]+): (.*)$", problem)
    if field:
        name, problem = field.groups()
        path = f"{path}.{name}" if path else name
    var = from_env.get(path)
    where = f"{path} (from {var})" if var else path or "(top level)"
    return f"{source}: {where}: {problem}"


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from `path` (or ``RSAGA_CONFIG``, or ``config/rsaga.toml`` if present),
    then the ``RSAGA_*`` environment overrides."""
    env = os.environ if environ is None else environ
    explicit = path or env.get("RSAGA_CONFIG")
    config_path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    raw: dict[str, Any] = {}
    if config_path.exists():
        try:
            raw = msgspec.toml.decode(config_path.read_bytes())
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML: {exc}") from None
    elif explicit:
        raise ConfigError(f"{config_path}: config file not found")
    source = str(config_path) if config_path.exists() else "defaults"
    from_env: dict[str, str] = {}
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in env:
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: {section}: expected a table")
            table[key] = env[var].split(",") if key == "handlers" else env[var]
            from_env[f"{section}.{key}"] = var
    if from_env:
        source += " + environment"
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_one_line(exc, source, from_env)) from None
