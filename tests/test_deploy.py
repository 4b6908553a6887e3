"""deploy/: the Dockerfile and compose example run commands this rsaga accepts, and each
container's healthcheck checks that container's own process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rsaga.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
COMPOSE = (DEPLOY / "compose.yaml").read_text()


def rsaga_commands(text: str) -> list[list[str]]:
    """Every exec-form command list that runs rsaga, e.g. ``["rsaga", "worker"]``."""
    lists = [json.loads(m) for m in re.findall(r'\[\s*"[^\]\n]*\]', text)]
    return [cmd[cmd.index("rsaga"):] for cmd in lists if "rsaga" in cmd]


@pytest.mark.parametrize("text", [DOCKERFILE, COMPOSE], ids=["Dockerfile", "compose"])
def test_every_rsaga_command_is_one_this_cli_accepts(text: str) -> None:
    commands = rsaga_commands(text)
    assert ["rsaga", "health", "--local"] in commands
    for command in commands:
        args = build_parser().parse_args(command[1:])
        assert args.run is not None


def test_each_container_checks_its_own_process() -> None:
    assert 'HEALTHCHECK' in DOCKERFILE
    healthchecks = re.findall(r"test: (\[.*\])", COMPOSE)
    assert '["CMD", "rsaga", "health", "--local"]' in healthchecks
    assert '["CMD", "rsaga", "health"]' not in healthchecks  # the whole deployment's


def test_compose_runs_redis_two_workers_and_a_scheduler() -> None:
    services = COMPOSE.split("\nservices:\n", 1)[1].split("\nvolumes:", 1)[0]
    names = re.findall(r"^  ([a-z-]+):$", services, flags=re.MULTILINE)
    assert names == ["redis", "worker", "scheduler"]
    worker = services.split("  worker:\n", 1)[1].split("\n\n", 1)[0]
    assert "replicas: 2" in worker


def test_the_dockerfile_copies_what_exists() -> None:
    root = DEPLOY.parent
    for line in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, flags=re.MULTILINE):
        for source in line.split():
            assert (root / source).exists(), source
