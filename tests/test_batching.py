"""Automatic pipelining (`rsaga.batching`) on fakeredis and on a real redis-server."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rsaga.batching import CallBatcher


def counted(redis: Redis) -> dict[str, int]:
    """Count the client's single commands and pipelines (instance-level wrappers)."""
    counts = {"commands": 0, "pipelines": 0, "pipelined": 0}
    execute_command, pipeline = redis.execute_command, redis.pipeline

    async def one(*args: Any, **options: Any) -> Any:
        counts["commands"] += 1
        return await execute_command(*args, **options)

    def many(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def run(raise_on_error: bool = True) -> Any:
            counts["pipelines"] += 1
            counts["pipelined"] += len(pipe.command_stack)
            return await execute(raise_on_error)

        pipe.execute = run  # type: ignore[method-assign]
        return pipe

    redis.execute_command = one  # type: ignore[method-assign]
    redis.pipeline = many  # type: ignore[method-assign]
    return counts


pytestmark = pytest.mark.parametrize("redis", ["fakeredis", "redis"], indirect=True)
"""One node only: on a cluster each script call is a round trip of its own."""


async def test_a_lone_call_goes_at_once_without_a_pipeline(redis: Redis, prefix: str) -> None:
    counts = counted(redis)
    batcher = CallBatcher(redis)
    for n in range(1, 4):
        assert await batcher.execute("INCR", f"{prefix}:n") == n
    assert counts == {"commands": 3, "pipelines": 0, "pipelined": 0}


async def test_calls_of_one_turn_share_a_pipeline_and_get_their_own_replies(
    redis: Redis, prefix: str
) -> None:
    counts = counted(redis)
    batcher = CallBatcher(redis)
    replies: dict[int, Any] = {}

    async def call(n: int) -> None:
        replies[n] = await batcher.execute("INCRBY", f"{prefix}:k{n % 3}", n)

    async with anyio.create_task_group() as tg:
        for n in range(30):
            tg.start_soon(call, n)
    # The first call went alone; the 29 made while it was on its way shared one pipeline.
    assert counts == {"commands": 1, "pipelines": 1, "pipelined": 29}
    totals = {k: sum(n for n in range(30) if n % 3 == k) for k in range(3)}
    assert {int(await redis.get(f"{prefix}:k{k}")) for k in range(3)} == set(totals.values())
    running: dict[int, int] = {0: 0, 1: 0, 2: 0}
    for n in range(30):  # every caller got the value after its own INCRBY, in call order
        running[n % 3] += n
        assert replies[n] == running[n % 3]


async def test_an_error_reaches_only_its_own_caller(redis: Redis, prefix: str) -> None:
    batcher = CallBatcher(redis)
    await redis.set(f"{prefix}:text", "abc")
    results: dict[str, Any] = {}

    async def call(name: str, *args: Any) -> None:
        try:
            results[name] = await batcher.execute(*args)
        except ResponseError as exc:
            results[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "first", "INCR", f"{prefix}:a")
        tg.start_soon(call, "bad", "INCR", f"{prefix}:text")
        tg.start_soon(call, "last", "INCR", f"{prefix}:b")
    assert results["first"] == 1
    assert results["last"] == 1
    assert isinstance(results["bad"], ResponseError)
