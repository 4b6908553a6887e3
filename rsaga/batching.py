"""Automatic pipelining: the script calls that tasks make in the same turn of the
event loop go to Redis as one pipeline (one write, one read), not one round trip each.

A worker runs many entries at once, and each one reads a stream and commits; alone,
each of those calls pays a whole round trip of client CPU (packing, a send syscall,
a pooled connection, a timed read, parsing). Gathered, a batch of calls pays that
once. A call still waits for its own reply only: nothing is delayed beyond the
current turn of the loop, and a batch is sent while the previous one is in flight.

Nothing is re-sent: when the connection drops, every call of the batch gets the
error, exactly as each would have alone (see `rsaga.connection.connect`).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError


class CallBatcher:
    """Gathers the commands of one client into pipelines, one per turn of the loop."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: list[tuple[Sequence[Any], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        """Calls and pipelines sent and not answered yet."""

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply (or raise its error): at once when
        nothing of this client is on its way (no turn of the loop is waited for, as
        a lone caller would otherwise), else in the next pipeline of this turn."""
        if not self._in_flight and not self._pending:
            self._in_flight += 1  # the calls made meanwhile gather into a pipeline
            try:
                return await self.redis.execute_command(*args)  # type: ignore[no-untyped-call]
            finally:
                self._in_flight -= 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((args, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = asyncio.ensure_future(self._send(batch))
        # The loop holds tasks weakly: keep each until it has delivered its replies.
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Sequence[Any], asyncio.Future[Any]]]) -> None:
        self._in_flight += 1
        try:
            replies = await self._round_trip([args for args, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        finally:
            self._in_flight -= 1
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _round_trip(self, commands: list[Sequence[Any]]) -> list[Any]:
        if len(commands) == 1:
            try:
                return [await self.redis.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
            except ResponseError as exc:
                return [exc]
        pipe = self.redis.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        return list(await pipe.execute(raise_on_error=False))


_batchers: weakref.WeakKeyDictionary[Redis, CallBatcher] = weakref.WeakKeyDictionary()


def batcher_for(redis: Redis) -> CallBatcher:
    """The one batcher of a client, shared by everything that calls scripts through it."""
    batcher = _batchers.get(redis)
    if batcher is None:
        batcher = _batchers[redis] = CallBatcher(redis)
    return batcher
