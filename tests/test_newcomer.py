"""The newcomer's path, run as a new user would: a clean clone, a fresh venv, the
README's commands as written (read from the README itself), the Procfile recipe
against a real redis-server, and a venv with only `rsaga` that lists no handler.

Slow (pip installs into a fresh venv), so marked `slow`; CI runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rsaga.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

pytestmark = [pytest.mark.slow, pytest.mark.real_redis]


def sh_blocks(after: str) -> list[str]:
    """The ```sh blocks of the README section that starts with the line `after`."""
    section = README.split(after, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def recipe_parts(block: str) -> dict[str, list[str]]:
    """A recipe block's commands under each ``# label:`` comment line."""
    parts: dict[str, list[str]] = {}
    label = ""
    for line in block.splitlines():
        if re.fullmatch(r"# [a-z0-9 ]+:", line.strip()):
            label = line.strip()[2:-1]
        elif line.strip():
            parts.setdefault(label, []).append(line)
    return parts


def new_user_env(**extra: str) -> dict[str, str]:
    """This machine's environment as a new user has it: no rsaga settings, no venv."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("RSAGA_", "PYTEST", "COV_"))
        and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p
    )
    return {**env, **extra}


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, text=True,
        capture_output=True, timeout=timeout, check=False,
    )


def wait_for_heartbeats(url: str, *, workers: int, schedulers: int,
                        honcho: subprocess.Popen[str]) -> None:
    """Wait, as a person watching terminal 1 would, until the processes are up."""
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            assert honcho.poll() is None, "honcho exited"
            kinds = [b'"kind":"worker"' in (client.get(key) or b"")
                     for key in client.scan_iter(match="rsaga:heartbeat:*")]
            if kinds.count(True) >= workers and kinds.count(False) >= schedulers:
                return
            time.sleep(0.2)
    finally:
        client.close()
    raise AssertionError("the Procfile's workers and scheduler never showed a heartbeat")


def show(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def clean_clone(tmp_path: Path) -> Path:
    """A clean clone of this repository's committed state."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    where = tmp_path / "rsaga"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(where)], check=True)
    return where


def test_the_readme_commands_and_the_procfile_recipe_as_a_new_user(tmp_path: Path) -> None:
    clone = clean_clone(tmp_path)
    demo_command, test_command = sh_blocks("## Two commands")
    env = new_user_env()

    # The first command: install and run the demo (embedded fakeredis).
    result = bash(demo_command, clone, env, timeout=900)
    assert result.returncode == 0, show(result)
    assert "result: OK, every process ended as expected" in result.stdout, show(result)

    # The second command's install, as written; one quick test file stands for the
    # suite (CI runs the whole suite itself).
    install = test_command.strip().removesuffix(".venv/bin/pytest").rstrip(" &")
    assert install != test_command.strip()
    result = bash(f"{install} && .venv/bin/pytest -q -p no:cacheprovider tests/test_events.py",
                  clone, env, timeout=900)
    assert result.returncode == 0, show(result)

    # The Procfile recipe, both terminals, against a private redis-server.
    recipe = sh_blocks("Against a real Redis, with honcho as the Procfile runner")[0]
    parts = recipe_parts(recipe)
    assert set(parts) == {"once", "in both terminals", "terminal 1", "terminal 2"}
    with RedisServer() as server:
        both = "\n".join(parts["in both terminals"]).replace(
            "redis://127.0.0.1:6379/0", server.url
        )
        assert server.url in both  # the recipe sets the URL we replaced
        result = bash("\n".join(parts["once"]), clone, env, timeout=600)
        assert result.returncode == 0, show(result)
        honcho = subprocess.Popen(
            ["bash", "-c", "\n".join([both, *parts["terminal 1"]])],
            cwd=clone, env=env, text=True, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_heartbeats(server.url, workers=2, schedulers=1, honcho=honcho)
            started = time.monotonic()
            result = bash("\n".join([both, *parts["terminal 2"]]), clone, env, timeout=300)
            took = time.monotonic() - started
        finally:
            os.killpg(honcho.pid, signal.SIGTERM)
            try:
                honcho_out, _ = honcho.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(honcho.pid, signal.SIGKILL)
                honcho_out, _ = honcho.communicate()
        assert result.returncode == 0, show(result) + f"\n--- honcho\n{honcho_out}"
        assert "result: OK, every process ended as expected" in result.stdout
        assert "100 processes" in result.stdout
        assert "no live" not in result.stdout  # the workers were alive all along
        assert "Traceback" not in honcho_out, honcho_out
        assert took < 120, f"the drive-only demo took {took:.0f}s"

    # A venv with only rsaga: no handler, and the demo says how to get the examples.
    result = bash(".venv/bin/pip uninstall -q -y rsaga-examples", clone, env, timeout=300)
    assert result.returncode == 0, show(result)
    result = bash(".venv/bin/rsaga handlers", clone, env, timeout=60)
    assert result.returncode == 0, show(result)
    assert result.stdout.startswith("no handlers installed"), show(result)
    result = bash(".venv/bin/rsaga demo", clone, env, timeout=60)
    assert result.returncode == 2, show(result)
    assert "pip install -e ./handlers" in result.stderr, show(result)
    # Nothing called `handlers` is installed for a user's own package to collide with.
    result = bash(f"{clone}/.venv/bin/python -c 'import handlers'", tmp_path, env, timeout=60)
    assert "No module named 'handlers'" in result.stderr, show(result)
