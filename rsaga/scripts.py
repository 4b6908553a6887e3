"""Loads the Lua scripts in ``rsaga/lua/`` and runs them with EVALSHA.

Each ``.lua`` file is one atomic state change. Shared helpers live in
``lua/includes/``, one ``local function`` per file, pulled in with a line
``-- @include "name"``; each include is expanded once per script, and a cycle
is an error. On NOSCRIPT (a restarted or flushed server, a replica promoted by a
failover, a cluster node that never saw the script) the call is repeated once with
EVAL, which runs the script on the node that owns the keys and caches it there.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from rsaga.errors import RsagaError

_INCLUDE = re.compile(r'^--\s*@include\s+"([A-Za-z0-9_]+)"\s*$', re.MULTILINE)

EncodableArg = bytes | str | int | float


class ScriptLoadError(RsagaError):
    """A Lua file is missing or its includes form a cycle."""


def _read(relative: str) -> str:
    path = resources.files("rsaga").joinpath("lua", relative)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptLoadError(f"Lua file not found: rsaga/lua/{relative}") from None


def expand_includes(source: str, read_include: Any = None, _stack: tuple[str, ...] = ()) -> str:
    """Expand ``-- @include "name"`` lines recursively; each include appears once."""
    reader = read_include or (lambda name: _read(f"includes/{name}.lua"))
    seen: set[str] = set()

    def expand(text: str, stack: tuple[str, ...]) -> str:
        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in stack:
                raise ScriptLoadError("include cycle: " + " -> ".join((*stack, name)))
            if name in seen:
                return f"-- ({name} already included)"
            seen.add(name)
            return expand(reader(name), (*stack, name))

        return _INCLUDE.sub(replace, text)

    return expand(source, _stack)


class Script:
    """One Lua script: its expanded source, SHA1, and an EVALSHA call with NOSCRIPT fallback."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(
        self, redis: Redis, keys: Sequence[str], args: Sequence[EncodableArg]
    ) -> Any:
        """Run the script; send its source if the node does not know it."""
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Not SCRIPT LOAD: on a cluster that goes to every master, and one
            # master down would stop the shards of all the others.
            return await redis.eval(self.source, len(keys), *keys, *args)

    async def load(self, redis: Redis) -> None:
        """Load the script into the server's script cache (every master of a cluster)."""
        await redis.script_load(self.source)


@cache
def script(name: str) -> Script:
    """The script in ``rsaga/lua/<name>.lua``, includes expanded (cached)."""
    return Script(name, expand_includes(_read(f"{name}.lua")))


def all_scripts() -> list[Script]:
    """Every script in the package, for `rsaga check` and warm-up."""
    names = sorted(
        entry.name.removesuffix(".lua")
        for entry in resources.files("rsaga").joinpath("lua").iterdir()
        if entry.name.endswith(".lua")
    )
    return [script(name) for name in names]
