"""The `rsaga` command line: exit codes, messages, and the commands against a real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis
from worker_plugins import Ping

from rsaga import EventRegistry, EventStore, Keyspace
from rsaga.cli import main
from rsaga.deadletters import DeadLetters

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str) -> Path:
    """An empty working directory (no config file) and a clean RSAGA_* environment."""
    for var in list(os.environ):
        if var.startswith("RSAGA_") and var != "RSAGA_REQUIRE_REDIS":
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSAGA_PREFIX", prefix)
    return tmp_path


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("rsaga ")
    assert main([]) == 2


def test_invalid_config_is_one_line_and_exit_2(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RSAGA_SHARDS", "zero")
    assert main(["check"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "store.shards (from RSAGA_SHARDS)" in err


def test_check_without_a_redis_url_is_a_config_error(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check"]) == 2
    assert "RSAGA_REDIS_URL" in capsys.readouterr().err


def test_unreachable_redis_exits_1_without_the_password(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rsaga.testing import free_port

    monkeypatch.setenv("RSAGA_REDIS_URL", f"redis://me:s3cret@127.0.0.1:{free_port()}/0")
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach Redis at redis://me:***@127.0.0.1" in err
    assert "s3cret" not in err


def test_check_prints_the_setup(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
    prefix: str,
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "server     Redis " in out
    assert f"prefix     {prefix}" in out
    assert "shards     1" in out


def test_handlers_lists_the_installed_examples(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["handlers"]) == 0
    out = capsys.readouterr().out
    assert "order-fulfilment" in out
    assert "process" in out
    assert "entry point" in out


def test_an_unknown_handler_name_is_a_config_error(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["worker", "--handler", "nope"]) == 2
    assert "no handler named nope" in capsys.readouterr().err


def test_dlq_list_replay_and_drop(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
    prefix: str,
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    keyspace = Keyspace(prefix=prefix)

    async def seed() -> list[str]:
        redis = Redis.from_url(real_redis_url)
        for n in range(3):
            await redis.xadd(
                keyspace.dead_letters(0),
                {"handler": "h", "s": f"s{n}", "v": "1", "d": b"x", "error_type": "ValueError",
                 "error": f"boom {n}", "attempts": "3", "failed_at_ms": "0"},
            )
        ids = [i.decode() for i, _ in await redis.xrange(keyspace.dead_letters(0))]
        await redis.aclose()
        return ids

    ids = anyio.run(seed)
    assert main(["dlq", "list"]) == 0
    out = capsys.readouterr().out
    assert "boom 0" in out
    assert "s2@1" in out
    assert main(["dlq", "replay", ids[0]]) == 0
    assert "replayed as log entry" in capsys.readouterr().out
    assert main(["dlq", "drop", ids[1]]) == 0
    assert main(["dlq", "drop", ids[1]]) == 1
    assert main(["dlq", "list", "--json"]) == 0
    assert '"stream_id":"s2"' in capsys.readouterr().out

    async def remaining() -> tuple[int, int]:
        redis = Redis.from_url(real_redis_url)
        letters = await DeadLetters(redis, keyspace).count()
        log_len = await redis.xlen(keyspace.log(0))
        await redis.aclose()
        return letters, log_len

    assert anyio.run(remaining) == (1, 1)


@pytest.mark.slow
async def test_a_second_signal_exits_at_once(
    redis_server: object, prefix: str, tmp_path: Path
) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    redis = Redis.from_url(url)
    store = EventStore(redis, EventRegistry([Ping]), keyspace=Keyspace(prefix=prefix))
    process = subprocess.Popen(
        [sys.executable, "-m", "rsaga.cli", "worker", "--handler", "sleepy"],
        cwd=ROOT,
        env={
            **os.environ,
            "RSAGA_REDIS_URL": url,
            "RSAGA_PREFIX": prefix,
            "RSAGA_HANDLERS": "worker_plugins:Sleepy",
            "PYTHONPATH": str(ROOT / "tests"),
        },
        stderr=subprocess.PIPE,
    )
    try:
        await store.append("slow", [Ping()])
        key = store.keyspace.log(0)
        deadline = time.monotonic() + 20

        async def handling() -> bool:
            groups = await redis.xinfo_groups(key)
            return any(g["name"] == b"sleepy" and g["pending"] == 1 for g in groups)

        while not await handling():
            assert time.monotonic() < deadline, "the handler never started"
            await anyio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        await anyio.sleep(0.3)
        assert process.poll() is None  # still finishing its 60 s handler, gracefully
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(5) == 1
        assert time.monotonic() - sent < 2
    finally:
        process.kill()
        await redis.aclose()


def test_process_show_of_an_unknown_id_says_so_and_exits_1(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    assert main(["process", "show", "order-fulfilment-nope"]) == 1
    assert "no process with stream 'order-fulfilment-nope'" in capsys.readouterr().err


def test_health_of_an_empty_deployment_is_ok_and_lists_nothing(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    assert main(["health"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("status: OK")
    assert "workers: 0 live" in out
    assert main(["timeouts", "list"]) == 0
    assert "no timeouts scheduled" in capsys.readouterr().out
    assert main(["process", "list", "--state", "stuck"]) == 0


def test_logs_are_key_value_or_json(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import logging

    from rsaga import logs

    logs.configure("json", "INFO")
    logging.getLogger("rsaga.test").warning(
        "handled", extra={"correlation_id": "c1", "causation_id": "e0"}
    )
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (line["msg"], line["correlation_id"], line["causation_id"]) == ("handled", "c1", "e0")
    logs.configure("kv", "INFO")
    logging.getLogger("rsaga.test").warning("two words", extra={"correlation_id": "c2"})
    assert 'msg="two words" correlation_id=c2' in capsys.readouterr().err
