"""The `rsaga` command line: exit codes, messages, and the commands against a real Redis."""

from __future__ import annotations

import argparse
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
from rsaga.cli import build_parser, main
from rsaga.deadletters import DeadLetters

ROOT = Path(__file__).resolve().parent.parent


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


def test_handlers_lists_handlers_named_by_import_path(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RSAGA_HANDLERS", "rsaga_examples.orders:OrderFulfilment")
    assert main(["handlers"]) == 0
    out = capsys.readouterr().out
    assert "order-fulfilment" in out
    assert "process" in out
    assert "import path rsaga_examples.orders:OrderFulfilment" in out
    assert main(["handlers", "list"]) == 0
    assert capsys.readouterr().out == out


def test_an_unknown_handler_name_is_a_config_error(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["worker", "--handler", "nope"]) == 2
    assert "no handler named nope" in capsys.readouterr().err


async def _seed_dead_letters(url: str, keyspace: Keyspace, fields: list[dict[str, str]]
                             ) -> list[str]:
    redis = Redis.from_url(url)
    for entry in fields:
        await redis.xadd(
            keyspace.dead_letters(0),
            {"handler": "h", "s": "s", "v": "1", "d": b"x", "error_type": "ValueError",
             "error": "boom", "attempts": "3", "failed_at_ms": "0", **entry},
        )
    ids = [i.decode() for i, _ in await redis.xrange(keyspace.dead_letters(0))]
    await redis.aclose()
    return ids


def test_dlq_list_replay_and_drop(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
    prefix: str,
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    keyspace = Keyspace(prefix=prefix)

    fields = [{"s": f"s{n}", "error": f"boom {n}"} for n in range(3)]
    ids = anyio.run(_seed_dead_letters, real_redis_url, keyspace, fields)
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


# --- a CLI that explains itself -----------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((f"{parser.prog} {name}".removeprefix("rsaga "), sub))
                found.extend(_subparsers(sub))
    return found


def test_every_command_and_option_explains_itself() -> None:
    parser = build_parser()
    top = parser.format_help()
    assert "exit codes:" in top
    for var in ("RSAGA_REDIS_URL", "RSAGA_PREFIX", "RSAGA_SHARDS", "RSAGA_HANDLERS"):
        assert var in top
    commands = _subparsers(parser)
    assert {"worker", "process list", "timeouts list", "stream show", "dlq replay"} <= {
        name for name, _ in commands
    }
    for name, sub in commands:
        assert sub.description, f"rsaga {name} has no description"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"rsaga {name} {action.dest} has no help"
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action)


def test_inspection_commands_are_noun_verb() -> None:
    parser = build_parser()
    for argv in (["timeouts", "list"], ["stream", "show", "s-1"], ["process", "list"],
                 ["dlq", "list"], ["handlers", "list"]):
        args = parser.parse_args(argv)
        assert args.action == argv[1]


def _no_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    import rsaga.handlers

    monkeypatch.setattr(rsaga.handlers, "entry_points", lambda group: [])


def test_a_worker_with_no_handler_exits_2_saying_how_to_register_one(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_entry_points(monkeypatch)
    monkeypatch.setenv("RSAGA_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["worker"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert 'entry-points."rsaga.handlers"' in err
    assert "RSAGA_HANDLERS=module:Class" in err
    assert main(["handlers"]) == 0
    assert capsys.readouterr().out.startswith("no handlers installed: register one")


def test_handlers_are_imported_from_the_current_directory(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = f"app_{env.name.replace('-', '_')}"
    (env / f"{module}.py").write_text(
        "from rsaga_examples.orders import PaymentService\n\n\n"
        "class Payments(PaymentService):\n    name = 'my-payments'\n"
    )
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(env))])
    monkeypatch.setenv("RSAGA_HANDLERS", f"{module}:Payments")
    assert main(["handlers"]) == 0
    assert "my-payments" in capsys.readouterr().out


def test_a_handler_module_raising_at_import_is_one_line_and_exit_2(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = f"broken_{env.name.replace('-', '_')}"
    (env / f"{module}.py").write_text("raise RuntimeError('no database')\n")
    monkeypatch.setenv("RSAGA_HANDLERS", f"{module}:Handler")
    for argv in (["handlers"], ["worker"], ["process", "show", "x-1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "failed at import: RuntimeError: no database" in err


def test_dead_letter_ids_are_printed_as_the_commands_take_them(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
    prefix: str,
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    anyio.run(_seed_dead_letters, real_redis_url, Keyspace(prefix=prefix), [{}, {}])
    assert main(["dlq", "list"]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == 2
    assert main(["dlq", "replay", printed[0]]) == 0
    assert "replayed as log entry" in capsys.readouterr().out
    assert main(["dlq", "drop", printed[1]]) == 0
    assert main(["dlq", "drop", printed[1]]) == 1
    capsys.readouterr()
    for bad in ("garbage", "0/garbage", "x/1-0", "7/1-0", "1-0-0"):
        assert main(["dlq", "replay", bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "Traceback" not in err
        assert bad in err


def test_control_characters_from_redis_are_escaped(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
    prefix: str,
) -> None:
    hostile = "\x1b]0;pwned\x07\x1b[2J\u202e"
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    anyio.run(_seed_dead_letters, real_redis_url, Keyspace(prefix=prefix),
              [{"s": f"s{hostile}", "error": f"boom{hostile}", "handler": hostile}])
    assert main(["dlq", "list"]) == 0
    out = capsys.readouterr().out
    for control in ("\x1b", "\x07", "\u202e"):
        assert control not in out
    assert "s\\x1b]0;pwned\\x07" in out
    assert main(["process", "show", f"p-{hostile}"]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err
    assert "\\x1b" in err


def test_the_kv_logger_escapes_control_characters(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from rsaga import logs

    logs.configure("kv", "INFO")
    logging.getLogger("rsaga.test").warning(
        "bad \x1b]0;pwned\x07", extra={"stream_id": "s\x1b[2J", "correlation_id": "c\u202e"}
    )
    err = capsys.readouterr().err
    for control in ("\x1b", "\x07", "\u202e"):
        assert control not in err
    assert 'msg="bad \\u001b]0;pwned\\u0007"' in err
    assert 'stream_id="s\\u001b[2J"' in err


INSPECTION = (
    ["check"],
    ["health"],
    ["process", "list"],
    ["process", "show", "order-fulfilment-1"],
    ["timeouts", "list"],
    ["stream", "show", "s-1"],
    ["archive"],
    ["dlq", "list"],
    ["dlq", "replay", "0/1-0"],
    ["dlq", "drop", "0/1-0"],
    ["dlq", "replay", "--all"],
    ["demo", "--drive-only", "--orders", "1", "--trips", "0"],
    ["demo", "--clean"],
)


def _one_line_each(capsys: pytest.CaptureFixture[str], code: int, needle: str) -> None:
    for argv in INSPECTION:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err
        assert needle in err, (argv, err)


def test_redis_down_is_one_line_and_exit_1_for_every_command(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rsaga.testing import free_port

    monkeypatch.setenv("RSAGA_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    _one_line_each(capsys, 1, "cannot reach Redis at redis://127.0.0.1")


def _acl_user(url: str, user: str, *rules: str) -> None:
    async def run() -> None:
        redis = Redis.from_url(url)
        await redis.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", *rules)
        await redis.aclose()

    anyio.run(run)


def test_refused_credentials_are_one_line_and_exit_2_for_every_command(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_server: object,
) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    _acl_user(url, "app", "~*", "+@all")
    monkeypatch.setenv("RSAGA_REDIS_URL", url.replace("redis://", "redis://app:wrong@"))
    _one_line_each(capsys, 2, "refused the credentials")


def test_a_user_without_permissions_gets_one_line_and_exit_1_for_every_command(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_server: object,
) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    _acl_user(url, "nobody", "-@all", "+auth", "+hello")
    monkeypatch.setenv("RSAGA_REDIS_URL", url.replace("redis://", "redis://nobody:pw@"))
    _one_line_each(capsys, 1, "may not do this")


def test_health_local_checks_this_hosts_own_heartbeat(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
    prefix: str,
) -> None:
    import socket

    from rsaga.health import Heartbeat, write_heartbeat

    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    keyspace = Keyspace(prefix=prefix)

    async def beat(host: str) -> None:
        redis = Redis.from_url(real_redis_url)
        heartbeat = Heartbeat(f"w-{host}", host, 1, ["h"], time.time(), "worker")
        await write_heartbeat(redis, keyspace, heartbeat, 10.0)
        await redis.aclose()

    anyio.run(beat, "some-other-host")
    assert main(["health", "--local"]) == 1
    assert "no live heartbeat" in capsys.readouterr().out
    anyio.run(beat, socket.gethostname())
    assert main(["health", "--local"]) == 0
    assert "ok: worker" in capsys.readouterr().out
    from rsaga.testing import free_port

    monkeypatch.setenv("RSAGA_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["health", "--local"]) == 1  # never 2: Docker reserves it


def test_demo_clean_removes_what_the_demo_wrote(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
    prefix: str,
) -> None:
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)

    async def keys(pattern: str) -> int:
        redis = Redis.from_url(real_redis_url)
        found = [k async for k in redis.scan_iter(match=pattern, count=1000)]
        await redis.aclose()
        return len(found)

    argv = ["demo", "--orders", "3", "--trips", "3", "--timeout-rate", "0", "--seed", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"written under prefix '{prefix}-demo'" in out
    assert f"RSAGA_PREFIX={prefix}-demo rsaga process list" in out
    assert anyio.run(keys, f"{prefix}-demo:*") > 10
    assert anyio.run(keys, f"{prefix}:*") == 0
    assert main(["demo", "--clean"]) == 0
    assert f"under prefix '{prefix}-demo'" in capsys.readouterr().out
    assert anyio.run(keys, f"{prefix}-demo:*") == 0
