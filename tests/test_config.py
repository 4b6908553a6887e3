"""Settings: defaults, TOML file, RSAGA_* overrides, one-line errors, URL redaction."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import msgspec
import pytest

from rsaga import ConfigError, ExponentialBackoff, FixedDelay, LinearBackoff, load_settings
from rsaga.config import (
    ENV_OVERRIDES,
    OTHER_VARIABLES,
    RedisSettings,
    Settings,
    parse_redis_url,
    redact_url,
    settings_table,
)
from rsaga.executor import DEFAULT_COMMAND_RETRY


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory, so no ``config/rsaga.toml`` is picked up by accident."""
    monkeypatch.chdir(tmp_path)
    for var in [*ENV_OVERRIDES, "RSAGA_CONFIG"]:
        monkeypatch.delenv(var, raising=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None = None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ if environ is not None else {})
    message = str(caught.value)
    assert "\n" not in message, "config errors are one line"
    return message


FULL = """
[redis]
url = "redis://app:hunter2@cache.internal:6380/2"
socket_timeout = 1.5
max_connections = 8

[store]
prefix = "bank"
shards = 4
max_event_bytes = 4096
read_page_size = 64

[executor]
retry = { kind = "fixed", interval = 0.0, max_retries = 2 }

[worker]
block_ms = 200
"""


def test_defaults_without_a_file() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.redis.url == ""
    assert settings.redis.socket_timeout == 5.0
    assert settings.redis.max_connections == 1000
    assert settings.store.prefix == "rsaga"
    assert settings.store.shards == 1
    assert settings.store.max_event_bytes == 1024 * 1024
    assert settings.store.read_page_size == 512
    assert settings.executor.retry == DEFAULT_COMMAND_RETRY


def test_values_from_a_toml_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path / "conf.toml", FULL), environ={})
    assert settings.redis == RedisSettings(
        url="redis://app:hunter2@cache.internal:6380/2", socket_timeout=1.5, max_connections=8
    )
    assert settings.store.prefix == "bank"
    assert settings.store.shards == 4
    assert settings.store.max_event_bytes == 4096
    assert settings.store.read_page_size == 64
    assert settings.executor.retry == FixedDelay(interval=0.0, max_retries=2)


def test_an_idle_wait_longer_than_the_socket_timeout_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[redis]\nsocket_timeout = 1\n[worker]\nblock_ms = 1000\n")
    message = config_error(path)
    assert "worker.block_ms: must stay below redis.socket_timeout (1s)" in message


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[store]\nshards = 2\n[executor.retry]\nkind = "linear"\n')
    settings = load_settings(path, environ={})
    assert settings.store.shards == 2
    assert settings.store.prefix == "rsaga"
    assert settings.redis == RedisSettings()
    assert settings.executor.retry == LinearBackoff()


def test_default_path_is_config_rsaga_toml_in_the_working_directory(tmp_path: Path) -> None:
    write(tmp_path / "config" / "rsaga.toml", '[store]\nprefix = "fromdefault"\n')
    assert load_settings(environ={}).store.prefix == "fromdefault"


def test_rsaga_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "elsewhere.toml", '[store]\nprefix = "viaenv"\n')
    assert load_settings(environ={"RSAGA_CONFIG": str(path)}).store.prefix == "viaenv"


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    message = config_error(tmp_path / "missing.toml")
    assert "missing.toml" in message
    assert "not found" in message
    assert "not found" in config_error(environ={"RSAGA_CONFIG": str(tmp_path / "nope.toml")})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "conf.toml", FULL)
    settings = load_settings(
        path,
        environ={
            "RSAGA_REDIS_URL": "redis://127.0.0.1:7000/1",
            "RSAGA_PREFIX": "envprefix",
            "RSAGA_SHARDS": "8",
            "RSAGA_MAX_EVENT_BYTES": "1000",
            "RSAGA_REDIS_SOCKET_TIMEOUT": "0.25",
            "RSAGA_REDIS_MAX_CONNECTIONS": "3",
        },
    )
    assert settings.redis.url == "redis://127.0.0.1:7000/1"
    assert settings.redis.socket_timeout == 0.25
    assert settings.redis.max_connections == 3
    assert settings.store.prefix == "envprefix"
    assert settings.store.shards == 8
    assert settings.store.max_event_bytes == 1000
    # Not overridden: from the file.
    assert settings.store.read_page_size == 64


def test_environment_overrides_without_a_file() -> None:
    settings = load_settings(environ={"RSAGA_SHARDS": "3", "RSAGA_PREFIX": "p1"})
    assert settings.store.shards == 3
    assert settings.store.prefix == "p1"


def test_environ_parameter_replaces_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSAGA_SHARDS", "7")
    assert load_settings(environ={}).store.shards == 1
    assert load_settings().store.shards == 7


def test_bad_env_value_names_the_key_and_the_variable() -> None:
    message = config_error(environ={"RSAGA_SHARDS": "many"})
    assert "store.shards" in message
    assert "RSAGA_SHARDS" in message
    assert "environment" in message


def test_bad_file_value_names_the_key_and_the_file(tmp_path: Path) -> None:
    message = config_error(write(tmp_path / "c.toml", '[store]\nshards = "x"\n'))
    assert "c.toml" in message
    assert "store.shards" in message
    assert "RSAGA_" not in message


def test_out_of_range_file_value_is_an_error(tmp_path: Path) -> None:
    message = config_error(write(tmp_path / "c.toml", "[store]\nshards = 0\n"))
    assert "store" in message
    assert "store.shards: must be >= 1, got 0" in message


def test_out_of_range_file_value_names_the_dotted_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path / "c.toml", "[store]\nshards = 0\n"))
    assert "store.shards" in message


def test_out_of_range_env_value_blames_the_right_variable() -> None:
    message = config_error(environ={"RSAGA_PREFIX": "fine", "RSAGA_SHARDS": "0"})
    assert "RSAGA_SHARDS" in message
    assert "RSAGA_PREFIX" not in message


def test_out_of_range_env_value_alone_names_its_variable() -> None:
    message = config_error(environ={"RSAGA_SHARDS": "0"})
    assert "RSAGA_SHARDS" in message
    assert "store.shards (from RSAGA_SHARDS): must be >= 1" in message


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[store]\nshard = 2\n", "unknown field `shard`"),
        ("[stor]\nshards = 2\n", "unknown field `stor`"),
        ("[redis]\nurl = 'redis://h'\ntimeout = 1\n", "unknown field `timeout`"),
        ("[executor]\nretries = 3\n", "unknown field `retries`"),
    ],
)
def test_unknown_keys_are_errors(tmp_path: Path, toml: str, needle: str) -> None:
    assert needle in config_error(write(tmp_path / "c.toml", toml))


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ("[store]\nprefix = 'has space'\n", ["store", "prefix"]),
        ("[store]\nmax_event_bytes = 0\n", ["store", "store.max_event_bytes: must be >= 1"]),
        ("[store]\nread_page_size = -5\n", ["store", "store.read_page_size: must be >= 1"]),
        ("[redis]\nsocket_timeout = 0\n", ["redis", "redis.socket_timeout: must be > 0"]),
        ("[redis]\nmax_connections = 0\n", ["redis", "redis.max_connections: must be >= 1"]),
        ("[executor.retry]\nkind = 'fixed'\ninterval = -1\n", ["executor.retry", "interval"]),
        ("[executor.retry]\nkind = 'sometimes'\n", ["executor.retry.kind", "sometimes"]),
        ("store = 5\n", ["store"]),
    ],
)
def test_invalid_values_are_one_line_errors(
    tmp_path: Path, toml: str, needles: list[str]
) -> None:
    message = config_error(write(tmp_path / "c.toml", toml))
    for needle in needles:
        assert needle in message


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    message = config_error(write(tmp_path / "c.toml", "[store\nshards = 2\n"))
    assert "not valid TOML" in message
    assert "c.toml" in message


def test_env_override_into_a_non_table_is_an_error(tmp_path: Path) -> None:
    message = config_error(write(tmp_path / "c.toml", "store = 5\n"), {"RSAGA_SHARDS": "2"})
    assert "store" in message
    assert "table" in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://user:pw@redis.example.com:6380/1",
        "unix:///var/run/redis.sock",
        "",
    ],
)
def test_accepted_urls(url: str) -> None:
    assert load_settings(environ={"RSAGA_REDIS_URL": url}).redis.url == url


def test_bad_url_scheme_is_refused_without_leaking_the_password() -> None:
    message = config_error(environ={"RSAGA_REDIS_URL": "http://app:s3cr3t@host:6379/0"})
    assert "RSAGA_REDIS_URL" in message
    assert "scheme" in message
    assert "s3cr3t" not in message
    assert "app:***@host" in message


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:secret@host:6380", "rediss://:***@host:6380"),
        ("redis://user:p@ss@host/0", "redis://user:***@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host:6379/0", "redis://user@host:6379/0"),
        ("redis://app:Zx9/Qw+7Lk==@host:6379/0", "redis://app:***@host:6379/0"),
        ("rediss://app:a#b?c@host:6380", "rediss://app:***@host:6380"),
        ("unix://:p/w@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis://h:6379/0?password=s3&db=1", "redis://h:6379/0?password=***&db=1"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url_hides_the_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_url_hides_a_query_password() -> None:
    assert "secret" not in redact_url("redis://host:6379/0?password=secret")


def test_retry_policy_from_file_kinds(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        "[executor]\nretry = { kind = 'exponential', base = 0.5, cap = 2.0, multiplier = 3 }\n",
    )
    assert load_settings(path, environ={}).executor.retry == ExponentialBackoff(
        base=0.5, cap=2.0, multiplier=3.0
    )


SLASHY_PASSWORDS = ["Zx9/Qw+7Lk==", "Ab3#Cd4?Ef5", "Pq7@Rs8/Tu9#Vw0?Xy1", "Mn2%2FOp3"]


@pytest.mark.parametrize("password", SLASHY_PASSWORDS)
def test_a_password_with_reserved_characters_is_read_as_a_password(password: str) -> None:
    settings = load_settings(environ={"RSAGA_REDIS_URL": f"redis://app:{password}@host:6380/2"})
    address = parse_redis_url(settings.redis.url)
    assert address.address == "redis://host:6380/2"
    assert address.username == "app"
    assert address.password == unquote(password)
    assert password not in repr(settings)


@pytest.mark.parametrize("password", SLASHY_PASSWORDS)
@pytest.mark.parametrize(
    "url",
    [
        "redis://app:{}@host:port/0",
        "redis://app:{}@host:6379/abc",
        "redis://app:{}@:6379/0",
        "http://app:{}@host:6379/0",
    ],
)
def test_a_bad_url_never_prints_its_password(url: str, password: str) -> None:
    message = config_error(environ={"RSAGA_REDIS_URL": url.format(password)})
    assert "RSAGA_REDIS_URL" in message
    assert "app:***@" in message
    for piece in re.split(r"[/#?@%]", password):
        assert piece not in message


def test_a_non_numeric_database_is_a_config_error() -> None:
    message = config_error(environ={"RSAGA_REDIS_URL": "redis://host:6379/abc"})
    assert "redis.url (from RSAGA_REDIS_URL): database must be a number" in message


@pytest.mark.parametrize(
    "url", ["redis://h:6379/0", "redis://h:6379/", "redis://h:6379", "redis://h/15"]
)
def test_numeric_or_no_database_is_accepted(url: str) -> None:
    assert load_settings(environ={"RSAGA_REDIS_URL": url}).redis.url == url


def test_password_settings_from_the_environment(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", "from-file\n")
    settings = load_settings(
        environ={
            "RSAGA_REDIS_URL": "redis://host:6379/0",
            "RSAGA_REDIS_USERNAME": "app",
            "RSAGA_REDIS_PASSWORD_FILE": str(secret),
        }
    )
    assert settings.redis.username == "app"
    assert settings.redis.password_file == str(secret)
    settings = load_settings(
        environ={"RSAGA_REDIS_URL": "redis://host:6379/0", "RSAGA_REDIS_PASSWORD": "hunter2"}
    )
    assert settings.redis.password == "hunter2"
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.redis)


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        (
            {"RSAGA_REDIS_URL": "redis://:inurl@h/0", "RSAGA_REDIS_PASSWORD": "hunter2"},
            "redis.password (from RSAGA_REDIS_PASSWORD): given more than once, in redis.url and",
        ),
        (
            {"RSAGA_REDIS_URL": "redis://h/0?password=inurl", "RSAGA_REDIS_PASSWORD": "hunter2"},
            "redis.password (from RSAGA_REDIS_PASSWORD): given more than once, in redis.url and",
        ),
        (
            {"RSAGA_REDIS_URL": "redis://u@h/0", "RSAGA_REDIS_USERNAME": "other"},
            "redis.username (from RSAGA_REDIS_USERNAME): given twice",
        ),
        (
            {"RSAGA_REDIS_URL": "redis://h/0", "RSAGA_REDIS_PASSWORD_FILE": "/nonexistent/pw"},
            "redis.password_file (from RSAGA_REDIS_PASSWORD_FILE): no such file: /nonexistent/pw",
        ),
    ],
)
def test_conflicting_or_missing_credentials_are_config_errors(
    environ: dict[str, str], needle: str
) -> None:
    message = config_error(environ=environ)
    assert needle in message
    assert "hunter2" not in message
    assert "inurl" not in message


def test_tls_files_from_the_environment(tmp_path: Path) -> None:
    ca, cert, key = (write(tmp_path / name, "PEM") for name in ("ca.pem", "c.pem", "k.pem"))
    settings = load_settings(
        environ={
            "RSAGA_REDIS_URL": "rediss://host:6380/0",
            "RSAGA_REDIS_TLS_CA": str(ca),
            "RSAGA_REDIS_TLS_CERT": str(cert),
            "RSAGA_REDIS_TLS_KEY": str(key),
        }
    )
    assert (settings.redis.tls_ca, settings.redis.tls_cert, settings.redis.tls_key) == (
        str(ca), str(cert), str(key)
    )


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        (
            {"RSAGA_REDIS_URL": "redis://:pw@host/0", "RSAGA_REDIS_TLS_CA": "{ca}"},
            "redis.tls_ca (from RSAGA_REDIS_TLS_CA): TLS needs a rediss:// url, "
            "redis.url is redis://:***@host/0",
        ),
        (
            {"RSAGA_REDIS_URL": "rediss://host/0", "RSAGA_REDIS_TLS_CERT": "/nonexistent.pem"},
            "redis.tls_cert (from RSAGA_REDIS_TLS_CERT): no such file: /nonexistent.pem",
        ),
        (
            {"RSAGA_REDIS_URL": "rediss://host/0", "RSAGA_REDIS_TLS_KEY": "{ca}"},
            "redis.tls_key (from RSAGA_REDIS_TLS_KEY): set redis.tls_cert too",
        ),
    ],
)
def test_bad_tls_settings_are_config_errors(
    tmp_path: Path, environ: dict[str, str], needle: str
) -> None:
    ca = write(tmp_path / "ca.pem", "PEM")
    message = config_error(environ={k: v.format(ca=ca) for k, v in environ.items()})
    assert needle in message


def test_every_setting_has_exactly_one_environment_variable() -> None:
    every = [
        (section.name, field.name)
        for section in msgspec.structs.fields(Settings)
        for field in msgspec.structs.fields(section.type)
    ]
    assert sorted(ENV_OVERRIDES.values()) == sorted(every)
    assert all(var.startswith("RSAGA_") for var in ENV_OVERRIDES)


@pytest.mark.parametrize(
    ("var", "text", "expected"),
    [
        ("RSAGA_HANDLERS", "a.b:C, d:E", ["a.b:C", "d:E"]),
        ("RSAGA_EXECUTOR_RETRY", '{"kind": "fixed", "interval": 0.5}', FixedDelay(interval=0.5)),
        ("RSAGA_CLAIM_TIMEOUT", "", None),
        ("RSAGA_CLAIM_TIMEOUT", "2.5", 2.5),
        ("RSAGA_WORKER_BATCH_SIZE", "7", 7),
        ("RSAGA_WORKER_START", "new", "new"),
        ("RSAGA_HEALTH_FAILURE_RATE_WARNING", "0.25", 0.25),
        ("RSAGA_SCHEDULER_MAX_SLEEP", "1", 1.0),
        ("RSAGA_REDIS_CONNECT_TIMEOUT", "0", 0.0),
    ],
)
def test_environment_values_of_every_kind(var: str, text: str, expected: object) -> None:
    section, key = ENV_OVERRIDES[var]
    settings = load_settings(environ={var: text})
    assert getattr(getattr(settings, section), key) == expected


def test_a_retry_policy_that_is_not_json_is_one_line() -> None:
    message = config_error(environ={"RSAGA_EXECUTOR_RETRY": "fixed"})
    assert "executor.retry (from RSAGA_EXECUTOR_RETRY): expected a JSON object" in message


@pytest.mark.parametrize(
    ("var", "closest"),
    [
        ("RSAGA_SHARD", "RSAGA_SHARDS"),
        ("RSAGA_REDIS_PASWORD", "RSAGA_REDIS_PASSWORD"),
        ("RSAGA_LOGLEVEL", "RSAGA_LOG_LEVEL"),
        ("RSAGA_WORKER_CONCURRENCY", "RSAGA_CONCURRENCY"),
    ],
)
def test_an_unknown_variable_is_an_error_naming_the_closest(var: str, closest: str) -> None:
    message = config_error(environ={var: "2"})
    assert message == f"environment: {var} is not a known variable; did you mean {closest}?"


def test_an_unknown_variable_far_from_any_known_one_points_at_the_readme() -> None:
    message = config_error(environ={"RSAGA_XYZZY": "1"})
    assert message == (
        "environment: RSAGA_XYZZY is not a known variable; see the README's Configuration"
    )


def test_variables_that_are_not_settings_are_accepted() -> None:
    environ = dict.fromkeys(OTHER_VARIABLES, "1")
    environ.pop("RSAGA_CONFIG")
    assert load_settings(environ={**environ, "OTHER_APP_SHARD": "x"}) == Settings()


def test_the_readme_configuration_table_matches_the_settings() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert settings_table() in readme, (
        "README's configuration table is stale; regenerate it with "
        "python -c 'from rsaga.config import settings_table; print(settings_table())'"
    )
