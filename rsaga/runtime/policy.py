"""The per-entry policy: handle an entry, retry it, or move it to dead letters."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import anyio

from rsaga.config import WorkerSettings
from rsaga.errors import EventDecodeError
from rsaga.logs import event_fields
from rsaga.observe import Observer
from rsaga.records import DeadLetterRecord, record_of
from rsaga.runtime.consumer import GroupConsumer, RawEntry
from rsaga.runtime.liveness import Backoff, redis_down
from rsaga.runtime.sources import UNDELIVERABLE, Source

log = logging.getLogger("rsaga.worker")


class Subscriber(Protocol):
    """A subscription, as its entry policy sees it."""

    source: Source
    consumer: GroupConsumer
    settings: WorkerSettings
    observer: Observer
    stopping: bool

    @property
    def name(self) -> str:
        """The source's name and shard, for messages."""
        ...

    async def retrying(
        self, what: str, call: Callable[..., Awaitable[Any]], *args: Any, resync: bool = False
    ) -> Any:
        """`await call(*args)`, waiting out Redis outages."""
        ...

    def finished(self, entries: Sequence[RawEntry]) -> None:
        """Forget entries that are done (acknowledged or dead-lettered)."""
        ...


class EntryPolicy:
    """Handles one entry at a time for a subscription: decode, handle with retries,
    dead-letter what can never be handled or keeps failing."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub

    async def process(self, entry: RawEntry) -> bool:
        """Handle, retry or dead-letter one entry; True when it is to be acknowledged."""
        if entry.deliveries > self.sub.settings.max_deliveries:
            # Checked before decoding: decoding is part of what may have crashed.
            reason = RuntimeError(
                f"started {entry.deliveries - 1} times without acknowledgement "
                "(did it crash its workers?)"
            )
            await self._dead_letter(entry, reason, attempts=entry.deliveries - 1, tb="")
            return False
        try:
            item = self.sub.source.decode(entry)
        except UNDELIVERABLE as exc:
            await self._dead_letter(entry, exc, attempts=0, tb="")
            return False
        except Exception as exc:
            # Whatever the bytes from Redis make the decoder raise, the entry can
            # never be handled: a dead letter with the reason, never a crash loop.
            undecodable = EventDecodeError(f"entry {entry.log_id} cannot be decoded: {exc!r}")
            tb = traceback.format_exc(limit=8)
            await self._dead_letter(entry, undecodable, attempts=0, tb=tb)
            return False
        if item is None:
            self.sub.observer.entry_handled(self.sub.source.name, seconds=0.0, outcome="skipped")
            return True
        attempt = 0
        backoff = Backoff(log)
        started = time.perf_counter()
        while True:
            attempt += 1
            try:
                await self.sub.source.handle(item, entry, attempt)
            except UNDELIVERABLE as exc:
                await self._dead_letter(entry, exc, attempt, traceback.format_exc(limit=8))
                return False
            except Exception as exc:
                if redis_down(exc):
                    attempt -= 1
                    await backoff.wait(f"{self.sub.name} handling {entry.log_id}", exc)
                    continue
                delay = self.sub.source.retry.delay(attempt)
                if self.sub.stopping:
                    return False
                if delay is None:
                    await self._dead_letter(
                        entry, exc, attempt, traceback.format_exc(limit=8), item
                    )
                    return False
                log.info(
                    "%s: %s failed (attempt %d): %r; retrying in %.2fs",
                    self.sub.name, entry.log_id, attempt, exc, delay,
                    extra=self._log_fields(item, entry),
                )
                self.sub.observer.entry_handled(
                    self.sub.source.name, seconds=time.perf_counter() - started, outcome="retried"
                )
                await anyio.sleep(delay)
                continue
            return True

    def _log_fields(self, item: Any, entry: RawEntry) -> dict[str, Any]:
        fields = {"group": self.sub.source.name, "stream_id": entry.stream_id or None}
        event = getattr(item, "event", None)
        if event is not None:
            fields.update(event_fields(event))
        return fields

    async def _dead_letter(
        self, entry: RawEntry, exc: BaseException, attempts: int, tb: str, item: Any = None
    ) -> None:
        letter = DeadLetterRecord(
            handler=self.sub.source.name,
            log_id=entry.log_id,
            error_type=type(exc).__name__,
            error=str(exc)[:2000],
            traceback=tb[-4000:],
            attempts=attempts,
            deliveries=entry.deliveries,
            failed_at_ms=int(time.time() * 1000),
            consumer=self.sub.consumer.name,
            record=record_of(entry.fields),  # an event or a due timeout: all of it
        )
        log.error(
            "%s: %s dead-lettered after %d attempts: %s: %s",
            self.sub.name, entry.log_id, attempts, type(exc).__name__, exc,
            extra=self._log_fields(item, entry),
        )
        self.sub.observer.entry_handled(self.sub.source.name, seconds=0.0, outcome="dead_lettered")
        dead_id = await self.sub.retrying(
            "dead-lettering",
            self.sub.consumer.dead_letter, entry, letter.encode(),
            self.sub.settings.dead_letter_max_len,
        )
        if not dead_id:
            log.warning("%s: %s was taken over; not dead-lettered", self.sub.name, entry.log_id)
        self.sub.finished([entry])
