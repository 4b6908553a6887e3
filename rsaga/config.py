"""Settings: ``config/rsaga.toml`` decoded with msgspec, overridden by ``RSAGA_*`` variables.

Unknown keys are errors (a typo must not be silently ignored). Every error is
one `ConfigError` line naming the key and the problem; the CLI exits 2 on it.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import itertools
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, get_args
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import msgspec

from rsaga.defaults import (
    DEFAULT_COMMAND_RETRY,
    DEFAULT_DEAD_LETTER_MAX_LEN,
    DEFAULT_PAGE_SIZE,
    DEFAULT_PROCESS_RETENTION,
    DEFAULT_STATE_CACHE_SIZE,
    DURABILITIES,
)
from rsaga.errors import ConfigError
from rsaga.events import DEFAULT_MAX_EVENT_BYTES
from rsaga.interceptors import unknown_names
from rsaga.retry import BuiltinRetryPolicy

DEFAULT_CONFIG_PATH = Path("config/rsaga.toml")


class RedisSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to reach Redis: address, credentials, TLS files and time limits.

    The password never shows in a message or a ``repr`` (``***``).
    """

    url: str = ""
    """``redis://[user:password@]host:port/db``, ``rediss://`` for TLS or ``unix://``;
    empty: no server (`rsaga demo` then runs on embedded fakeredis)."""
    username: str = ""
    """ACL user (instead of the one in `url`); empty: the URL's, or ``default``."""
    password: str = ""
    """Password (instead of the one in `url`); prefer `password_file`."""
    password_file: str = ""
    """File holding the password (one line), read at every new connection."""
    tls_ca: str = ""
    """PEM file of the CA that signed the server's certificate (``rediss://`` only)."""
    tls_cert: str = ""
    """PEM file of this client's certificate, for servers that require one (mutual TLS)."""
    tls_key: str = ""
    """PEM file of the private key of `tls_cert` (if not in the same file)."""
    socket_timeout: float = 5.0
    """Seconds before a Redis call without a blocking timeout gives up."""
    connect_timeout: float = 60.0
    """Seconds a starting worker or scheduler waits for Redis to answer before it exits 1."""
    max_connections: int = 1000
    """Ceiling on the connection pool of one process (connections open as needed; on a
    cluster, per node)."""
    cluster: bool = False
    """`url` names one node of a Redis Cluster: discover the others and route each key to
    its master (see docs/scaling.md)."""

    def __post_init__(self) -> None:
        address = parse_redis_url(self.url) if self.url else None
        if address is not None and self.username and address.username:
            raise ValueError("username: given twice, in redis.url and redis.username")
        passwords = [
            name
            for name, given in (
                ("redis.url", address is not None and address.password is not None),
                ("redis.password", bool(self.password)),
                ("redis.password_file", bool(self.password_file)),
            )
            if given
        ]
        if len(passwords) > 1:
            raise ValueError(f"password: given more than once, in {' and '.join(passwords)}")
        if self.password_file and not Path(self.password_file).is_file():
            raise ValueError(f"password_file: no such file: {self.password_file}")
        self._check_tls(address)
        if self.socket_timeout <= 0:
            raise ValueError(f"socket_timeout: must be > 0, got {self.socket_timeout}")
        if self.connect_timeout < 0:
            raise ValueError(f"connect_timeout: must be >= 0, got {self.connect_timeout}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections: must be >= 1, got {self.max_connections}")
        if self.cluster and address is not None and address.scheme == "unix":
            raise ValueError("cluster: a Redis Cluster is reached over TCP, not unix://")

    def _check_tls(self, address: RedisAddress | None) -> None:
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if not path:
                continue
            if address is None or address.scheme != "rediss":
                where = redact_url(self.url) if self.url else "empty"
                raise ValueError(f"{name}: TLS needs a rediss:// url, redis.url is {where}")
            if not Path(path).is_file():
                raise ValueError(f"{name}: no such file: {path}")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key: set redis.tls_cert too (the certificate of this key)")

    def __repr__(self) -> str:
        shown = {
            name: "***" if name == "password" and value else value
            for name, value in msgspec.structs.asdict(self).items()
        }
        shown["url"] = redact_url(self.url)
        return "RedisSettings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


class StoreSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The keyspace and event store."""

    prefix: str = "rsaga"
    """Prefix of every key."""
    shards: int = 1
    """Number of shards; each stream id maps to one (``crc32 % shards``) and its keys carry
    the shard as a hash tag. Changing it remaps streams."""
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    """Largest encoded event accepted."""
    read_page_size: int = DEFAULT_PAGE_SIZE
    """Events per XRANGE page when reading a stream."""
    durability: str = "async"
    """"async": a commit is acknowledged once its master has it (a failover can lose the
    last writes); "replicated": also once `replicas` replicas have it (WAIT), else an
    error."""
    replicas: int = 1
    """Replicas that must acknowledge a commit when `durability` is "replicated"."""
    replication_timeout: float = 1.0
    """Seconds a "replicated" commit waits for its replicas before it fails."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,50}", self.prefix):
            raise ValueError(f"prefix: must be 1-50 of [A-Za-z0-9._-], got {self.prefix!r}")
        for name in ("shards", "max_event_bytes", "read_page_size", "replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.shards > 16384:
            raise ValueError(f"shards: must be <= 16384, got {self.shards}")
        if self.durability not in DURABILITIES:
            raise ValueError(
                f"durability: must be 'async' or 'replicated', got {self.durability!r}"
            )
        if self.replication_timeout <= 0:
            raise ValueError(f"replication_timeout: must be > 0, got {self.replication_timeout}")


class ExecutorSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The command executor."""

    retry: BuiltinRetryPolicy = DEFAULT_COMMAND_RETRY
    """Retry policy on version conflicts: ``kind`` "fixed", "exponential" or "linear"."""
    state_cache_size: int = DEFAULT_STATE_CACHE_SIZE
    """Folded states (per command fold or process stream) a worker keeps, so the next
    command folds only newer events and may decide without reading; 0 turns the cache
    off. Any Redis error empties it (Redis may have restarted without some writes)."""

    def __post_init__(self) -> None:
        if self.state_cache_size < 0:
            raise ValueError(f"state_cache_size: must be >= 0, got {self.state_cache_size}")


class WorkerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`rsaga worker` processes."""

    handlers: list[str] = msgspec.field(default_factory=list)
    """Handlers to load by import path (``package.module:Class``), besides entry points."""
    interceptors: list[str] = msgspec.field(default_factory=list)
    """Interceptors around handler calls, commands, steps and timeouts, outermost first:
    ``metrics``, ``otel``, a ``rsaga.interceptors`` entry point or ``module:attribute``."""
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
    """Seconds a silent worker keeps its entries before others take over; None (empty in
    the environment): each handler's own `claim_timeout`."""
    max_deliveries: int = 5
    """Deliveries without acknowledgement (crashes) before an entry goes to dead letters."""
    dead_letter_max_len: int = DEFAULT_DEAD_LETTER_MAX_LEN
    """Dead letters kept per shard (oldest trimmed first, approximately)."""
    log_retention: float = 3600.0
    """Seconds acknowledged entries stay on the shard log before trimming."""
    trim_interval: float = 30.0
    """Seconds between trims of the shard logs."""

    def __post_init__(self) -> None:
        unknown = unknown_names(self.interceptors)
        if unknown:
            raise ValueError(unknown)
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
    retention_interval: float = 60.0
    """Seconds between removals of finished processes whose retention has passed."""
    retention_batch: int = 100
    """Finished processes removed per atomic script call (each call is one short step)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "retention_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_sleep", "heartbeat_ttl", "retention_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


class ProcessSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Process managers and sagas."""

    retention: float | None = DEFAULT_PROCESS_RETENTION
    """Seconds a finished process (its stream and index entries) is kept before the scheduler
    removes it; None (empty in the environment): for ever. A process type overrides it with
    its `retention` attribute."""

    def __post_init__(self) -> None:
        if self.retention is not None and not self.retention >= 0:
            raise ValueError(f"retention: must be >= 0 or None, got {self.retention}")


class HealthSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Thresholds of `rsaga health` (warning: exit 1, critical: exit 2)."""

    stuck_after: float = 3600.0
    """Seconds without progress after which an active process with no pending timeout counts
    as stuck (warning); one waiting on a timeout is stuck once it is `overdue_after` late."""
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


class MetricsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The Prometheus endpoint of `rsaga worker` and `rsaga scheduler` (``--metrics-port``)."""

    host: str = "0.0.0.0"
    """Address the metrics endpoint listens on (every interface by default, for scrapers)."""


class WebSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The operator console (`rsaga web`, needs the ``web`` extra)."""

    host: str = "127.0.0.1"
    """Address the console listens on; loopback by default."""
    port: int = 8080
    """Port the console listens on."""
    token: str = ""
    """Operator token that enables actions (replay, drop, terminate...); empty: read-only."""
    token_file: str = ""
    """File holding the operator token (one line), instead of `token`."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: must be in 1..65535, got {self.port}")
        if self.token and self.token_file:
            raise ValueError("token: given twice, in web.token and web.token_file")
        if self.token_file and not Path(self.token_file).is_file():
            raise ValueError(f"token_file: no such file: {self.token_file}")

    def operator_token(self) -> str | None:
        """The operator token (from `token` or `token_file`), or None: the console is read-only."""
        if self.token_file:
            return Path(self.token_file).read_text().strip() or None
        return self.token or None

    def __repr__(self) -> str:
        token = "***" if self.token else ""
        return (
            f"WebSettings(host={self.host!r}, port={self.port!r}, token={token!r}, "
            f"token_file={self.token_file!r})"
        )


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """All of rsaga's settings."""

    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    executor: ExecutorSettings = msgspec.field(default_factory=ExecutorSettings)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    scheduler: SchedulerSettings = msgspec.field(default_factory=SchedulerSettings)
    processes: ProcessSettings = msgspec.field(default_factory=ProcessSettings)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    web: WebSettings = msgspec.field(default_factory=WebSettings)

    def __post_init__(self) -> None:
        if self.worker.block_ms >= self.redis.socket_timeout * 1000:
            raise ValueError(
                f"worker.block_ms: must stay below redis.socket_timeout "
                f"({self.redis.socket_timeout:g}s), got {self.worker.block_ms} ms"
            )


_SHORT_NAMES: dict[tuple[str, str], str] = {
    ("store", "prefix"): "RSAGA_PREFIX",
    ("store", "shards"): "RSAGA_SHARDS",
    ("store", "max_event_bytes"): "RSAGA_MAX_EVENT_BYTES",
    ("store", "durability"): "RSAGA_DURABILITY",
    ("redis", "cluster"): "RSAGA_REDIS_CLUSTER",
    ("worker", "handlers"): "RSAGA_HANDLERS",
    ("worker", "interceptors"): "RSAGA_INTERCEPTORS",
    ("worker", "concurrency"): "RSAGA_CONCURRENCY",
    ("worker", "shutdown_timeout"): "RSAGA_SHUTDOWN_TIMEOUT",
    ("worker", "claim_timeout"): "RSAGA_CLAIM_TIMEOUT",
    ("health", "stuck_after"): "RSAGA_STUCK_AFTER",
    ("logging", "format"): "RSAGA_LOG_FORMAT",
    ("logging", "level"): "RSAGA_LOG_LEVEL",
}
"""Established names of the most used settings; every other one is RSAGA_<SECTION>_<KEY>."""


def _setting_keys() -> list[tuple[str, str]]:
    return [
        (section.name, field.name)
        for section in msgspec.structs.fields(Settings)
        for field in msgspec.structs.fields(section.type)
    ]


ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    _SHORT_NAMES.get(key, f"RSAGA_{key[0]}_{key[1]}".upper()): key for key in _setting_keys()
}
"""Environment variables and the setting each overrides: one for every setting."""

OTHER_VARIABLES: dict[str, str] = {
    "RSAGA_CONFIG": "the config file",
    "RSAGA_REQUIRE_REDIS": "the test kit: fail, not skip, without redis-server",
    "RSAGA_TEST_REDIS_URL": "the test kit: the Redis of real-Redis tests",
    "RSAGA_UPDATE_SCREENSHOTS": "the test suite: refresh the console screenshots in docs/",
    "RSAGA_SERVICE_LATENCY_MS": "the example application: simulated service latency",
}
"""``RSAGA_*`` variables that are not settings but are read by someone (never an error)."""

_LIST_SEPARATOR = ","


def _field(section: str, key: str) -> msgspec.structs.FieldInfo:
    section_type = next(f.type for f in msgspec.structs.fields(Settings) if f.name == section)
    return next(f for f in msgspec.structs.fields(section_type) if f.name == key)


def _from_env(section: str, key: str, text: str) -> Any:
    """An environment variable's text as the value the setting's type wants:
    a list is comma-separated, a table (the retry policy) JSON, empty is None
    where None is allowed; msgspec converts the rest from the text."""
    default = getattr(getattr(Settings(), section), key)
    if isinstance(default, list):
        return [item.strip() for item in text.split(_LIST_SEPARATOR) if item.strip()]
    if isinstance(default, msgspec.Struct):
        try:
            return msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            raise ValueError(f"expected a JSON object ({exc})") from None
    if text == "" and type(None) in get_args(_field(section, key).type):
        return None
    return text


def _unknown_variables(env: Mapping[str, str]) -> None:
    known = [*ENV_OVERRIDES, *OTHER_VARIABLES]
    for var in sorted(env):
        if var.startswith("RSAGA_") and var not in known:
            # Compared without the prefix every candidate shares, or all look close.
            close = difflib.get_close_matches(
                var.removeprefix("RSAGA_"), [k.removeprefix("RSAGA_") for k in known], n=1
            )
            hint = f"did you mean RSAGA_{close[0]}?" if close else "see the README's Configuration"
            raise ConfigError(f"environment: {var} is not a known variable; {hint}")


class RedisAddress(NamedTuple):
    """A Redis URL split into the address (no credentials in it) and the credentials."""

    scheme: str
    address: str
    """The URL without its user part: safe to print, parse and hand to redis-py."""
    username: str | None
    password: str | None


def _split_user_part(url: str) -> tuple[str, str | None, str]:
    """(scheme://, user part or None, the rest), split without parsing.

    The user part ends at the *last* ``@``: a password may hold ``@``, ``/``,
    ``?`` or ``#`` unencoded, which would make a URL parser read part of it as
    the host, port or path (and print it in the error).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    head = scheme + sep
    if "@" not in rest:
        return head, None, rest
    user_part, _, rest = rest.rpartition("@")
    return head, user_part, rest


def redact_url(url: str) -> str:
    """`url` with its password (in the user part or the query) replaced by ``***``.

    Never raises, whatever `url` holds.
    """
    head, user_part, rest = _split_user_part(url)
    if user_part is not None:
        user, has_password, _ = user_part.partition(":")
        user_part = f"{user}:***" if has_password else user
        head += user_part + "@"
    return head + re.sub(r"([?&]password=)[^&#]*", r"\1***", rest)


def parse_redis_url(url: str) -> RedisAddress:
    """Split and check a Redis URL; `ValueError` ("url: ...", password redacted) if bad.

    The user part is taken off before anything parses the URL, so a password
    with unencoded ``/``, ``#`` or ``?`` is read as a password, never printed.
    """
    head, user_part, rest = _split_user_part(url)
    scheme = head.removesuffix("://")
    shown = redact_url(url)
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"url: scheme must be redis://, rediss:// or unix://, got {shown!r}")
    username = password = None
    if user_part is not None:
        user, has_password, secret = user_part.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    address = head + rest
    parts = urlsplit(address)
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"url: unix:// needs the socket's path, got {shown!r}")
    else:
        if not parts.hostname:
            raise ValueError(f"url: no host in {shown!r}")
        try:
            parts.port  # noqa: B018 (urlsplit checks the port only when asked)
        except ValueError:
            raise ValueError(f"url: port must be a number, got {shown!r}") from None
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise ValueError(
                f"url: database must be a number (redis://host:port/0), got {shown!r}"
            )
    query = parse_qsl(parts.query, keep_blank_values=True)
    in_query = [value for name, value in query if name == "password"]
    if in_query:
        if password is not None:
            raise ValueError(f"url: password given twice (user part and query) in {shown!r}")
        password = in_query[0]
        rest_of_query = urlencode([(name, value) for name, value in query if name != "password"])
        address = urlunsplit(parts._replace(query=rest_of_query))
    return RedisAddress(scheme, address, username, password)


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
    _unknown_variables(env)
    from_env: dict[str, str] = {}
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in env:
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: {section}: expected a table")
            try:
                table[key] = _from_env(section, key, env[var])
            except ValueError as exc:
                raise ConfigError(f"environment: {section}.{key} (from {var}): {exc}") from None
            from_env[f"{section}.{key}"] = var
    if from_env:
        source += " + environment"
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_one_line(exc, source, from_env)) from None


def settings_table() -> str:
    """The README's table of every setting: key, environment variable, default, meaning.

    Meanings are the settings' own docstrings in this module, so the table
    cannot drift from the code (a test compares it with the README).
    """
    meanings = _field_docstrings()
    defaults = Settings()
    rows = [
        "| setting | env | default | meaning |",
        "|---|---|---|---|",
    ]
    for var, (section, key) in ENV_OVERRIDES.items():
        default = getattr(getattr(defaults, section), key)
        env = f"`{var}`"
        if isinstance(default, list):
            env += " (comma-separated)"
        elif isinstance(default, msgspec.Struct):
            env += " (JSON)"
        shown = msgspec.json.encode(default).decode()
        meaning = meanings[(section, key)].replace("``", "`").replace("|", "\\|")
        rows.append(f"| `{section}.{key}` | {env} | `{shown}` | {meaning} |")
    return "\n".join(rows)


def _field_docstrings() -> dict[tuple[str, str], str]:
    """(section, key) -> the docstring under the field, joined into one line."""
    classes = {
        cls.__name__: section.name
        for section in msgspec.structs.fields(Settings)
        for cls in [section.type]
    }
    found: dict[tuple[str, str], str] = {}
    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name not in classes:
            continue
        for field, doc in itertools.pairwise(node.body):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
            ):
                found[(classes[node.name], field.target.id)] = " ".join(doc.value.value.split())
    return found
