"""The worker: runs event handlers over the shard logs through consumer groups.

For every handler and shard a `_Subscription` reads batches (`GroupConsumer`),
runs the events of each stream one after another and different streams in
parallel (bounded by the worker's concurrency, see `rsaga.runtime.dispatch`),
acknowledges in batches, retries and dead-letters failures (the per-entry policy,
`rsaga.runtime.policy`), reclaims what dead consumers left pending, and keeps the
claims of running handlers fresh (`rsaga.runtime.liveness`). What each group
decodes and runs is its source (`rsaga.runtime.sources`).

Delivery is at least once; a handler makes its effect once by executing
commands with expected versions (see docs/design.md).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup
from redis.exceptions import ResponseError

from rsaga.clock import Clock
from rsaga.config import WorkerSettings
from rsaga.defaults import DEFAULT_PROCESS_RETENTION
from rsaga.executor import Executor
from rsaga.handlers import EventHandler
from rsaga.observe import Observer
from rsaga.process.api import ProcessManager
from rsaga.process.retention import Retention
from rsaga.process.runner import ProcessRunner
from rsaga.runtime.consumer import START_FROM_BEGINNING, START_FROM_NEW, GroupConsumer, RawEntry
from rsaga.runtime.dispatch import Isolation, Slots
from rsaga.runtime.liveness import (
    Backoff,
    consumer_name,
    keep_heartbeat,
    redis_down,
    redis_outage,
    this_process,
)
from rsaga.runtime.policy import EntryPolicy
from rsaga.runtime.sources import HandlerSource, ProcessSource, Source, TimeoutSource

log = logging.getLogger("rsaga.worker")


class _Subscription:
    """One source (handler, process type, or timeouts) on one shard: a consumer-group loop."""

    def __init__(
        self,
        source: Source,
        consumer: GroupConsumer,
        settings: WorkerSettings,
        limiter: Slots,
        isolation: Isolation,
        observer: Observer,
    ) -> None:
        self.source = source
        self.consumer = consumer
        self.settings = settings
        self.limiter = limiter
        self.isolation = isolation
        isolation.subscriptions.append(self)
        self.observer = observer
        self.policy = EntryPolicy(self)
        self._delivery_lock = anyio.Lock()
        self._queues: dict[str, deque[RawEntry]] = {}
        self._ready: deque[tuple[str, deque[RawEntry]]] = deque()
        """Streams queued and not yet taken by a drainer."""
        self._drainers = 0
        self._known: set[str] = set()
        self._to_ack: list[RawEntry] = []
        self._started: set[str] = set()
        """Entries a handler has started and that are not acknowledged yet."""
        self._started_in_redis: frozenset[str] = frozenset()
        """`_started` as last recorded in Redis."""
        self._start_wanted = anyio.Event()
        self._starts_recorded = anyio.Event()
        self._start_lock = anyio.Lock()
        self._ack_wanted = anyio.Event()
        self._space = anyio.Event()
        self.stopping = False
        self._read_nothing = False
        self._work: TaskGroup | None = None

    @property
    def name(self) -> str:
        return f"{self.source.name}@{self.consumer.shard}"

    # --- lifecycle ----------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing in hand, nothing to acknowledge, and the last read found nothing new."""
        return self._read_nothing and not self._known and not self._to_ack

    async def caught_up(self) -> bool:
        """The group has read its whole stream and acknowledged everything (from Redis)."""
        return await self.consumer.caught_up()

    async def run(self, stop: anyio.Event) -> None:
        """Consume until `stop` is set, then shut down gracefully."""
        self.stopping = False
        self._read_nothing = False
        await self.retrying("creating group", self._ensure_group)
        self._work = None
        async with anyio.create_task_group() as work:
            self._work = work
            # Entries already pending on this consumer (a restart under the same
            # name, or replies lost before a crash of ours) come first.
            await self.deliver("resyncing", self._resync)
            async with anyio.create_task_group() as io:
                io.start_soon(self._read_loop)
                io.start_soon(self._ack_loop)
                io.start_soon(self._start_loop)
                io.start_soon(self._claim_loop)
                io.start_soon(self._keep_alive_loop)
                await stop.wait()
                self.stopping = True
                io.cancel_scope.cancel()
            self._starts_recorded.set()  # runners waiting for a record write it themselves
            # Runners stop after their current entry; whatever still runs at the
            # deadline is cancelled and left pending.
            work.cancel_scope.deadline = anyio.current_time() + self.settings.shutdown_timeout
        # Streams no drainer took before the stop are dropped, as drained ones are
        # (their entries stay known and pending in Redis).
        for key, queue in self._ready:
            if self._queues.get(key) is queue:
                del self._queues[key]
        self._ready.clear()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            with redis_outage() as outage:
                async with self._delivery_lock:
                    await self.flush_acks(dispatch=False)
                await self.consumer.keep_alive(leaving=True)
            if outage.error is not None:
                log.warning("%s: could not say goodbye to Redis: %s", self.name, outage.error)
            if self._known:
                log.info("%s: left %d unfinished entries for others", self.name, len(self._known))
            await self.consumer.close()

    async def _ensure_group(self) -> None:
        # A timeouts group always starts at the beginning: due timeouts of its
        # process type may be waiting for the first worker that runs it.
        beginning = self.settings.start == "beginning" or isinstance(self.source, TimeoutSource)
        start = START_FROM_BEGINNING if beginning else START_FROM_NEW
        await self.consumer.ensure_group(start)

    async def retrying(
        self, what: str, call: Callable[..., Awaitable[Any]], *args: Any, resync: bool = False
    ) -> Any:
        """`await call(*args)`, waiting out Redis outages and recreating a lost group.

        With `resync`, a failed attempt is followed by `_resync` before the next:
        the failed call may have changed the group's state in Redis even though
        its reply was lost.
        """
        backoff = Backoff(log)
        failed = False
        while True:
            with redis_outage() as outage:
                try:
                    if failed and resync:
                        await self._resync()
                    return await call(*args)
                except ResponseError as exc:
                    if redis_down(exc) or "NOGROUP" not in str(exc):
                        raise
            failed = True
            if outage.error is not None:
                await backoff.wait(f"{self.name} {what}", outage.error)
            else:
                log.warning("%s: consumer group vanished (Redis restarted?); recreating", self.name)
                await self._ensure_group()

    async def deliver(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run a call that hands entries to this consumer, under the delivery lock.

        The lock keeps the order of delivered entries; on failure the call is
        retried after a resync, so no entry stays pending here unknown to us.
        """
        async with self._delivery_lock:
            return await self.retrying(what, call, *args, resync=True)

    async def _resync(self) -> None:
        """Pick up every entry pending on this consumer that we do not hold, in log order."""
        after = "0-0"
        while True:
            entries = await self.consumer.pending_here(after, 500)
            self._dispatch(entries)
            if len(entries) < 500:
                return
            after = entries[-1].log_id

    # --- reading and dispatching ----------------------------------------------------

    def _buffered(self) -> int:
        return len(self._known)

    def _capacity(self) -> int:
        return max(self.settings.batch_size, 4 * self.settings.concurrency)

    async def _read_loop(self) -> None:
        while True:
            while self._buffered() >= self._capacity():
                self._space = anyio.Event()
                await self._space.wait()
            count = min(self.settings.batch_size, self._capacity() - self._buffered())

            async def read_and_dispatch(count: int = count) -> str:
                result = await self.consumer.read(count, self.source.wanted)
                self._dispatch(result.entries)
                return result.last_id

            last_id = await self.deliver("reading", read_and_dispatch)
            self._read_nothing = bool(last_id)
            if last_id:
                with redis_outage() as outage:
                    await self.consumer.wait_for_entries(last_id, self.settings.block_ms)
                if outage.error is not None:
                    # No backoff of its own: the next read waits out an outage,
                    # and a dropped connection alone must not stall reading.
                    log.debug("%s: waiting for entries failed: %s", self.name, outage.error)
                    await anyio.sleep(Backoff.FIRST)

    def _dispatch(self, entries: Sequence[RawEntry]) -> None:
        """Queue entries per stream, in the order given; a stream new to the queues waits
        for a drainer (started here while fewer than `concurrency` run)."""
        assert self._work is not None
        for entry in entries:
            if entry.log_id in self._known:
                continue
            self._known.add(entry.log_id)
            key = entry.stream_id or entry.log_id
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = deque()
                self._ready.append((key, queue))
                if self._drainers < self.settings.concurrency:
                    self._drainers += 1
                    self._work.start_soon(self._drain_ready)
            queue.append(entry)

    async def _drain_ready(self) -> None:
        """Drain the queued streams one after another, each to its end: a stream is
        in `_ready` once, so one drainer at a time runs its entries, in order. A
        task per drainer, not per stream: starting a task per entry cost ~20 us."""
        try:
            while self._ready and not self.stopping:
                key, queue = self._ready.popleft()
                try:
                    while queue and not self.stopping:
                        if not await self._run(queue[0]):
                            return
                        queue.popleft()
                finally:
                    if self._queues.get(key) is queue:
                        del self._queues[key]
        finally:
            self._drainers -= 1

    async def _run(self, entry: RawEntry) -> bool:
        """Run one entry: with others normally, alone if a handler started it before a crash.

        Running a suspect alone, with everything before it acknowledged and only
        it recorded as started, lets the next take-over blame only the entry that
        crashed the worker, so a poison entry reaches dead letters without taking
        innocent entries with it. Returns False if the worker is stopping and it
        did not run.
        """
        isolation = self.isolation
        if entry.deliveries <= 1:
            async with isolation.gate.shared(), self.limiter:
                if self.stopping:
                    return False
                await self._record_start(entry)
                if await self.policy.process(entry):
                    self._to_ack.append(entry)
                    self._ack_wanted.set()
            return True
        async with isolation.gate.exclusive(), self.limiter:
            if self.stopping:
                return False
            await isolation.flush_all()
            await self._record_start(entry)
            if await self.policy.process(entry):
                self._to_ack.append(entry)
                await self.deliver("acknowledging", self.flush_acks)
        return True

    async def _record_start(self, entry: RawEntry) -> None:
        """Record in Redis that a handler starts `entry` (batched with other starts).

        A take-over counts a delivery only for recorded entries, so the record
        must be in Redis before the handler runs.
        """
        self._started.add(entry.log_id)
        self._start_wanted.set()
        while entry.log_id not in self._started_in_redis:
            if self.stopping:
                # The recording loop has stopped; this entry was already on
                # its way in when the stop came, so it still runs.
                await self.retrying("recording starts", self._write_starts)
            else:
                await self._starts_recorded.wait()

    async def _start_loop(self) -> None:
        while True:
            await self._start_wanted.wait()
            self._start_wanted = anyio.Event()
            await self.retrying("recording starts", self._write_starts)

    async def _write_starts(self) -> None:
        """Replace this consumer's record of started entries with what has started now.

        One write at a time: a late write of an older set would hide a start.
        """
        async with self._start_lock:
            started = frozenset(self._started)
            await self.consumer.record_started(started)
            self._started_in_redis = started
            recorded, self._starts_recorded = self._starts_recorded, anyio.Event()
            recorded.set()

    @property
    def acks_due(self) -> bool:
        """Whether finished entries wait to be acknowledged."""
        return bool(self._to_ack)

    def finished(self, entries: Sequence[RawEntry]) -> None:
        for entry in entries:
            self._known.discard(entry.log_id)
            self._started.discard(entry.log_id)
        self._space.set()

    # --- acknowledging, reclaiming, keeping claims fresh -----------------------------

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted = anyio.Event()
            await self.deliver("acknowledging", self.flush_acks)

    async def flush_acks(self, dispatch: bool = True) -> None:
        """Acknowledge what finished; dispatch the entries handed to us meanwhile.

        Call with the delivery lock held (`deliver` does).
        """
        if not self._to_ack and not dispatch:
            return
        batch, self._to_ack = self._to_ack, []
        room = max(1, self._capacity() - self._buffered()) if dispatch else 0
        try:
            _, handed = await self.consumer.ack(batch, room)
        except BaseException:
            self._to_ack[:0] = batch
            raise
        self.finished(batch)
        self._dispatch(handed)

    async def _claim_loop(self) -> None:
        interval = max(0.05, self.consumer.claim_timeout_ms / 2000)
        while True:
            await anyio.sleep(interval)
            await self.deliver("taking over dead consumers", self._take_over_dead)

    async def _take_over_dead(self) -> None:
        entries, dead = await self.consumer.take_over_dead()
        if dead:
            log.warning(
                "%s: took over %d entries of dead consumers %s",
                self.name, len(entries), ", ".join(dead),
            )
        self._dispatch(entries)

    async def _keep_alive_loop(self) -> None:
        interval = max(0.05, self.consumer.claim_timeout_ms / 3000)
        while True:
            await self.retrying("keeping alive", self.consumer.keep_alive)
            await anyio.sleep(interval)


class Worker:
    """Runs handlers and process managers over every shard until stopped.

    `run` returns after a graceful shutdown: reading stops, in-flight handlers get
    `settings.shutdown_timeout` seconds, finished entries are acknowledged, and
    unfinished ones are left for other workers to take over at once.
    """

    def __init__(
        self,
        executor: Executor,
        handlers: Sequence[EventHandler | ProcessManager[Any]],
        *,
        settings: WorkerSettings | None = None,
        name: str | None = None,
        clock: Clock | None = None,
        shards: Sequence[int] | None = None,
        retention: float | None = DEFAULT_PROCESS_RETENTION,
    ) -> None:
        self.executor = executor
        self.handlers = list(handlers)
        self.shards = list(range(executor.store.keyspace.shards) if shards is None else shards)
        """The shards this worker serves (`rsaga worker --shards`): all by default."""
        self.settings = settings or WorkerSettings()
        self.name = name or consumer_name()
        self.started_at = time.time()
        store = executor.store
        managers = [h for h in self.handlers if isinstance(h, ProcessManager)]
        self.runner = ProcessRunner(
            executor, managers, clock=clock, retention=retention
        ) if managers else None
        sources: list[tuple[Source, str, float]] = []
        for handler in self.handlers:
            if isinstance(handler, ProcessManager):
                assert self.runner is not None
                source: Source = ProcessSource(handler, self.runner)
            else:
                type(handler).validate()
                store.registry.register(*handler.events, *handler.decodes)
                source = HandlerSource(handler, executor)
            claim = self.settings.claim_timeout or type(handler).claim_timeout
            sources.append((source, "log", claim))
        for manager in managers:
            assert self.runner is not None
            claim = self.settings.claim_timeout or type(manager).claim_timeout
            sources.append((TimeoutSource(manager, self.runner), "due", claim))
        limiter = Slots(self.settings.concurrency)
        isolation = Isolation()
        ks = store.keyspace
        self.subscriptions = [
            _Subscription(
                source,
                GroupConsumer(
                    store.redis,
                    ks,
                    shard,
                    source.name,
                    self.name,
                    claim_timeout_ms=max(1, int(claim_timeout * 1000)),
                    stream=ks.log(shard) if stream == "log" else ks.due_timeouts(shard),
                ),
                self.settings,
                limiter,
                isolation,
                executor.observer,
            )
            for source, stream, claim_timeout in sources
            for shard in self.shards
        ]

    async def run(self, stop: anyio.Event) -> None:
        """Run until `stop` is set, then shut down gracefully."""
        log.info(
            "worker %s starting: handlers %s, concurrency %d",
            self.name, [h.name for h in self.handlers], self.settings.concurrency,
        )
        async with anyio.create_task_group() as tg:
            store = self.executor.store
            beat = this_process(self.name, [h.name for h in self.handlers], "worker")
            ttl = self.settings.heartbeat_ttl
            tg.start_soon(keep_heartbeat, store.redis, store.keyspace, beat, ttl, stop)
            tg.start_soon(self._trim_loop, stop)
            tg.start_soon(self._backfill_retention)
            async with anyio.create_task_group() as subs:
                for sub in self.subscriptions:
                    subs.start_soon(sub.run, stop)
            tg.cancel_scope.cancel()
        log.info("worker %s stopped", self.name)

    async def run_until_idle(self, *, poll: float = 0.005) -> None:
        """Handle everything there is to handle, then stop (burst mode: tests, batch jobs).

        Idle means every subscription is idle in memory and, in Redis, has read its
        whole stream and acknowledged everything, twice in a row.
        """
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.run, stop)
            quiet = 0
            while quiet < 2:
                await anyio.sleep(poll)
                if all(sub.idle for sub in self.subscriptions) and all(
                    [await sub.caught_up() for sub in self.subscriptions]
                ):
                    quiet += 1
                else:
                    quiet = 0
            stop.set()

    async def _backfill_retention(self) -> None:
        """Give the finished processes of this worker's types that have no expiry one
        (they finished before retention existed): once per start, best effort."""
        if self.runner is None:
            return
        store = self.executor.store
        retention = Retention(store.redis, store.keyspace)
        for manager in self.runner.managers.values():
            retention_ms = self.runner.retention_ms(manager)
            if retention_ms is None:
                continue  # kept for ever
            for shard in self.shards:
                with redis_outage() as outage:
                    added = await retention.backfill(shard, manager.name, retention_ms)
                    if added:
                        log.info(
                            "retention: %d finished %s process(es) of shard %d had no expiry; "
                            "they now expire %s after they finished",
                            added, manager.name, shard, f"{retention_ms / 1000:g} s",
                        )
                if outage.error is not None:
                    log.warning("retention backfill of %s skipped: %s", manager.name, outage.error)
                    return

    async def _trim_loop(self, stop: anyio.Event) -> None:
        store = self.executor.store
        retention_ms = int(self.settings.log_retention * 1000)
        while not stop.is_set():
            await anyio.sleep(self.settings.trim_interval)
            for key in {sub.consumer.log for sub in self.subscriptions}:
                with redis_outage() as outage:
                    await store.scripts.trim_log(key, retention_ms)
                if outage.error is not None:
                    log.warning("trimming %s failed: %s", key, outage.error)
