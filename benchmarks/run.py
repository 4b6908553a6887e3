"""Throughput, latency and storage benchmarks of rsaga against a real Redis.

Usage::

    python benchmarks/run.py [SCENARIO ...] [--json] [--duration SECONDS] [--warmup SECONDS]
    python benchmarks/run.py --list

Redis: ``RSAGA_REDIS_URL`` if set (keys go under a fresh prefix and are deleted
with SCAN + UNLINK at the end; nothing is flushed), otherwise a private
``redis-server`` on a free port (`rsaga.testing.RedisServer`), stopped at the end.

SCENARIO arguments pick scenarios by exact name or by prefix (``append`` picks
``append_c1`` and ``append_c32``); none runs them all. A scenario that reports a
ratio to a baseline pulls the baseline in, so the ratio is always measured in
the same run. ``--json`` prints one JSON object ``{scenario: {metric: value}}``
on stdout and nothing else (progress goes to stderr); without it a table.

Throughput scenarios (``_cN`` = N asyncio tasks, each looping one operation):
a warm-up of ``--warmup`` seconds (0.5), then ``--duration`` seconds (3) timed.

- ``raw_evalsha_cN``: EVALSHA of ``return 1`` through redis-py asyncio: the
  ceiling of one round trip through the client, the baseline of every ratio.
- ``raw_commit_cN``: EVALSHA of rsaga's own ``commit.lua`` appending one
  pre-encoded event to one of 10,000 streams: the server-side cost of an
  append without any of rsaga's Python.
- ``raw_pipeline_cN``: what a transfer command costs at the floor: one
  pipeline of 2 XRANGE over two of 10,000 seeded accounts, then one EVALSHA of
  ``commit.lua`` writing one pre-encoded event to each (no decoding, no
  retries).
- ``append_cN``: `EventStore.append` of one small event with expected=ANY to
  one of 10,000 stream ids.
- ``command_cN``: `Executor.execute` of a `Transfer` between two random
  accounts of 10,000 pre-seeded ones: reads 2 streams, folds them, handles,
  commits one event to each. `Transfer` folds each account apart
  (``fold_per_stream``) with a snapshot every 20 events. Before the warm-up,
  every account is used once (one untimed transfer each), so the figures are
  a steady state: snapshots written, the executor's state cache filled.
- ``command_len50_c32``: the same with account streams seeded to 50 events,
  so a command without cache or snapshot reads and folds ~100 events: the
  cost of folding history (``events_read_per_op`` shows what it read).
- ``command_len1000_c32``: the same over 1,000 accounts of 1,000 events each
  (1M events; 10,000 accounts would be 10M), ~2,000 events per command
  without a snapshot; ``ratio_to_command`` as for len50.
- ``contended_c64``: 64 tasks transferring 1 between random pairs of only 10
  accounts (one executor, so one state cache), for 10 x ``--duration`` seconds
  (30 at the default 3; no warm-up): the streams grow by thousands of events
  while it runs. ``first_tenth_per_s`` / ``last_tenth_per_s``: commands done
  per second in the first and the last tenth of the run, and
  ``last_to_first`` their ratio (history length must not slow commands down);
  ``retries_per_op`` (version conflicts per command done), ``gave_up``
  (commands whose retries ran out), ``events_read_per_attempt`` (events read
  from Redis per attempt, retries included: a retry should read only what
  changed since the version it saw), ``final_stream_len``.

Each scenario that uses accounts seeds a set of its own (one deposit each,
outside the timed part), so streams stay short (``events_read_per_op`` shows
how short) whatever ran before.

Metrics: ``ops_per_s``; ``p50_ms`` and ``p99_ms`` per-operation latency;
``round_trips_per_op`` counted at the client (each command sent and each
pipeline executed is one round trip); ``cpu_us_per_op``: this process's CPU
per operation (less sensitive than rates to other load on the machine); ``server_cmds_per_op`` from
``INFO commandstats`` deltas (commands a script runs count too, INFO itself is
left out; on a shared server other clients add to it); ``ratio_to_raw`` =
ops_per_s / raw_evalsha ops_per_s at the same concurrency (and for commands
``ratio_to_pipeline``, for appends ``ratio_to_commit``, against the raw scenario
doing the same Redis work); for commands ``retries_per_op`` (version conflicts)
and ``events_read_per_op`` (events folded by the attempt that succeeded).

The client is one Python process (one core), so on a small machine the figures
are mostly its CPU cost per operation: compare ratios within a run, not
absolute figures across machines or runs.

- ``event_bytes``: appends 10,000 ``Deposited`` events, one per new stream id,
  then reports ``MEMORY USAGE`` (SAMPLES 0) of the per-stream keys
  (``stream_bytes_per_event``) and of the shard log
  (``log_bytes_per_event``), their sum (``bytes_per_event``), the delta of
  INFO ``used_memory`` per event (only meaningful on a quiet server), and
  the mean envelope size.

Worker, scheduler and process scenarios run real ``rsaga worker`` and
``rsaga scheduler`` subprocesses (``python -m rsaga.cli`` in the repository,
environment ``RSAGA_REDIS_URL``, ``RSAGA_PREFIX``, ``RSAGA_HANDLERS``, and
``PYTHONPATH`` with ``benchmarks/`` for the handlers of ``plugins.py``, which
this script imports too), killed at the end of the scenario whatever happens
(SIGTERM to this script unwinds like Ctrl-C). ``startup_s`` is from spawning
them until every one has its heartbeat key, and is part of no rate. The
benchmark appends with pipelined ``commit.lua`` calls (`append_fast`), so that
appending is not what limits a rate; ``append_s`` says how long it took.

- ``raw_group``: one client reading a consumer group with XREADGROUP COUNT 100
  and XACK of each batch, over 20,000 pre-added log entries: the Redis floor of
  delivering events, the baseline of the ``handler_*`` ratios.
- ``handler_noop_pN`` / ``handler_command_pN`` (N = 1, 2 worker processes):
  a warm-up of 1,000 events, then 20,000 `plugins.Ping` events over 2,000
  streams appended at full speed; ``events_per_s`` = events / time from the
  first append until the group has acknowledged all (XINFO GROUPS: pending 0,
  last-delivered-id = last log id). The noop handler does nothing; the command
  handler executes one `plugins.Record` (read ``seen-<stream>``, append one
  event; checked afterwards: one per event). Then ``lat_p50_ms`` /
  ``lat_p99_ms``: append-to-handled latency of every event appended at a paced
  ``lat_rate`` events/s for 2 s (handler's clock minus occurred-at, which is
  truncated to the ms).
- ``timeout_lateness_idle``: one worker running `plugins.TimerProbe` and one
  scheduler; 200 timeouts due spread over 4 s, scheduled in advance by starting
  one process each from this process; ``late_*`` = when the probe's `decide`
  runs minus the due time (scheduler move + worker delivery + step);
  ``move_*`` = the scheduler's part (due-stream entry id time minus due).
  Nothing is sent to Redis from here while timeouts fall due. ``redis_hz``:
  the server's ``hz``, which bounds how late a blocking read returns on an
  idle server (1000/hz ms).
- ``timeout_lateness_loaded``: the same with 30,000 timeouts due over 3 s
  (10,000 per second); ``fired_per_s`` = timeouts / time from the first due
  time until all fired. ``timeout_lateness_loaded_w2``: the same with 2
  worker processes (``workers`` says how many ran).
- ``timeout_capacity``: one worker running `plugins.TimerProbe`, no
  scheduler; 20,000 probes started (their timeouts due at once, and the
  worker has read every start from the log), then this process drains the
  timeouts onto the due stream with `Scheduler.drain` (``move_s``) and times
  until every probe completed: ``steps_per_s`` = process steps per second
  one worker sustains from a full due stream.
- ``memory_per_process``: order fulfilment (``rsaga_examples.orders``) with a
  worker and a scheduler, in two keyspaces: ``finished_*`` with every service
  running, so 300 orders (after 50 warm-up ones) run to completion;
  ``active_*`` with only the process running, so 300 orders start and wait
  for their payment. ``*_bytes``: the growth of MEMORY USAGE (SAMPLES 0)
  summed over every key of the keyspace but the shard log and the due stream,
  per order (streams, process index, timeouts); ``*_log_bytes``: the shard
  log's growth per order (a delivery channel, trimmed after
  ``worker.log_retention``); ``*_used_memory``: INFO ``used_memory`` growth
  per order (only meaningful on a quiet server).
- ``timeout_drain``: 100,000 timeouts due in the past written directly to the
  shard's sorted set and data hash, then `Scheduler.drain` times
  (``timeouts_per_s``), against ``raw_per_s``: a Lua loop that only XADDs the
  same due-stream entries, 1,000 per call (``ratio_to_raw``).
- ``process_e2e``: 2 workers running the handlers installed from
  ``rsaga_examples.orders`` (order fulfilment and the simulated payment, inventory
  and shipping services, named with ``--handler``) and one scheduler; after
  50 warm-up orders, 1,000 `OrderPlaced` events at once:
  ``processes_per_s`` = orders / time from the first append until the
  process-stats hash counts them all completed; ``drained_s``: until every
  group has also read the whole log; ``burst_p50_ms`` / ``burst_p99_ms`` from
  OrderPlaced to ProcessCompleted (queueing included); ``log_entries_per_process``:
  shard-log entries one order writes (every group reads every one). Then
  ``dur_p50_ms`` / ``dur_p99_ms``: the same duration for orders placed at a
  paced ``dur_rate`` per second for 3 s.
- ``saga_e2e``: the same for the travel-booking saga of ``rsaga_examples.travel``:
  2 workers running ``travel-booking``, ``hotel-service``, ``flight-service``
  and ``car-service`` (entry points; ``RSAGA_HANDLERS`` for any not
  installed), services replying at once, and one scheduler; after 50 warm-up
  trips, 1,000 `TripRequested` events at once, 30% of them with ``fail_at``
  a random service, so their saga compensates what was booked.
  ``sagas_per_s`` = trips / time from the first append until the saga's
  process-stats hash has completed + compensated = all (checked afterwards: the
  planned split, and each saga stream ending in ProcessCompleted or a
  ProcessCompensated); ``saga_p50_ms`` / ``saga_p99_ms`` from each
  saga's ProcessStarted to its last event, ``burst_p50_ms`` /
  ``burst_p99_ms`` from the TripRequested append (queueing included);
  ``log_entries_per_saga``. Then ``dur_*`` (from the append) and
  ``dur_saga_*`` (from ProcessStarted) for trips requested at a paced
  ``dur_rate`` per second for 3 s, with the same 30% refused.

Redis Cluster scenarios start Redis of their own (whatever ``RSAGA_REDIS_URL``
says), all with ``store.shards = 8``: ``cluster_*`` on a private cluster of 3
masters, ``sharded_*`` the same scenario on one private server in the same run
(``ratio_to_node`` = cluster rate / one-node rate).

- ``sharded_command_c32`` / ``cluster_command_c32``: Transfers between two of
  2,000 accounts of one shard (a command's writes share a shard), 32 tasks;
  ``redis_cpu_us`` per command over all servers and ``redis_cpu_us_m<i>`` per
  master, ``client_cpu_us`` this process's CPU per command (the cost of
  client-side slot routing shows here).
- ``replicated_command_c32``: the same on 3 masters with a replica each, first
  with ``durability = "async"`` then ``"replicated"`` (WAIT 1 replica after each
  commit): ``ratio_to_async``.
- ``sharded_process_e2e`` / ``cluster_process_e2e``: 2 workers running the order
  fulfilment handlers and one scheduler (``RSAGA_REDIS_CLUSTER``,
  ``RSAGA_SHARDS=8``); after 50 warm-up orders, 300 orders appended by 32
  tasks: ``processes_per_s`` until every process-stats hash of the 8 shards
  counts them completed; ``redis_cpu_us`` (and per master) and
  ``worker_cpu_us`` (workers and scheduler) per process.

``BENCH_METRICS=1`` in this script's environment gives every worker of every
scenario a Prometheus endpoint (``--metrics-port``), so any scenario can be
measured with metrics on.

Per event, timeout, process or saga while timed: ``server_cmds`` (commands the
server ran, scripts' own included, this script's appends and polls too),
``scripts`` (EVALSHA calls), ``worker_cpu_us`` (all workers) and
``redis_cpu_us`` (INFO cpu). Cores busy on average: ``worker_busy``,
``redis_busy``, ``scheduler_busy``, ``bench_busy`` (this process), and
``machine_busy``, the share of all the machine's cores busy (/proc/stat),
which tells whether anything else was competing. Everything shares the
machine's cores (``os.cpu_count()`` is printed first).

A scenario that fails or passes its hard timeout reports ``error`` instead of
metrics, the run goes on, and the exit status is 1.

To add a scenario, write ``async def my_scenario(bench: Bench, ...) -> Metrics``
and register it with ``@scenario("name", **params)`` (stack one per parameter
set) or `register_concurrencies`; use `Bench.measure` for the warm-up and timed
loop, `Bench.store` for a store with keys of its own, `Bench.accounts` for
seeded account streams, `run_batch` for untimed setup, `Fleet` for worker and
scheduler subprocesses.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from types import TracebackType
from typing import Any

import anyio
import msgspec
from plugins import PROBE_TIMEOUT, Fired, Ping, Seen, TimerProbe, latency_key
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from rsaga_examples.orders import OrderPlaced
from rsaga_examples.travel import SERVICES, TRAVEL_EVENTS, TripRequested

from rsaga import (
    Command,
    DomainError,
    EventRegistry,
    EventStore,
    Executor,
    ExpectedVersion,
    Keyspace,
    RecordedEvent,
    RetriesExhausted,
    StreamId,
    Writes,
)
from rsaga.config import RedisSettings, redact_url
from rsaga.connection import connect as rsaga_connect
from rsaga.events import new_id
from rsaga.health import live_heartbeats
from rsaga.processes import (
    FRAMEWORK_EVENTS,
    ProcessCompensated,
    ProcessCompleted,
    ProcessRunner,
    ProcessStarted,
    TimeoutPayload,
    decode_timeout,
    timeout_id,
)
from rsaga.sagas import SAGA_EVENTS
from rsaga.scheduler import Scheduler
from rsaga.scripts import Script, script
from rsaga.store import StreamSlice
from rsaga.testing import RedisClusterNodes, RedisServer, free_port

Metric = float | int | str | None
Metrics = dict[str, Metric]
Operation = Callable[[], Awaitable[None]]

ACCOUNTS = 10_000
"""Seeded accounts for command scenarios, and stream ids for append scenarios."""
INITIAL_BALANCE = 1_000_000_000
EVENT_BYTES_EVENTS = 10_000
SETUP_CONCURRENCY = 32
PAGE_SIZE = 512
CONCURRENCIES = (1, 32)
LONG_HISTORY = 50
"""Events per account stream for command_len50_c32."""
VERY_LONG_HISTORY = 1_000
"""Events per account stream for command_len1000_c32."""
VERY_LONG_ACCOUNTS = 1_000
"""Accounts seeded for command_len1000_c32 (1M events: 10,000 would be 10M)."""
CONTENDED_ACCOUNTS = 10
CONTENDED_CONCURRENCY = 64
CONTENDED_SECONDS = 30.0
"""contended_c64's run: 10 x --duration, at most this."""


# --- the domain the benchmarks run ----------------------------------------------------


class Deposited(msgspec.Struct, frozen=True):
    amount: int


class Withdrawn(msgspec.Struct, frozen=True):
    amount: int


Balances = dict[str, int]


class Transfer(Command[Balances], frozen=True, kw_only=True):
    """Move `amount` from one account stream to another; each account folded apart."""

    fold_per_stream = True
    snapshot_every = 20
    source: StreamId
    target: StreamId
    amount: int = 1

    def initial_state(self) -> Balances:
        return {}

    def apply(self, state: Balances, event: RecordedEvent) -> Balances:
        data = event.data
        if isinstance(data, Deposited):
            state[event.stream_id] = state.get(event.stream_id, 0) + data.amount
        elif isinstance(data, Withdrawn):
            state[event.stream_id] = state.get(event.stream_id, 0) - data.amount
        return state

    def merge(self, states: Mapping[str, Balances]) -> Balances:
        return {k: v for part in states.values() for k, v in part.items()}

    def handle(self, state: Balances) -> Writes:
        if state.get(self.source, 0) < self.amount:
            raise DomainError(f"{self.source} cannot cover {self.amount}")
        return {self.source: [Withdrawn(self.amount)], self.target: [Deposited(self.amount)]}


REGISTRY_TYPES = (Deposited, Withdrawn)


# --- a client that counts round trips -----------------------------------------------


class RoundTrips:
    """How many requests the client sent and waited for."""

    def __init__(self) -> None:
        self.count = 0


class CountingPipeline(Pipeline):
    """A pipeline that counts one round trip per non-empty `execute`."""

    trips: RoundTrips

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if self.command_stack:
            self.trips.count += 1
        return await super().execute(raise_on_error)


class CountingRedis(Redis):
    """A `Redis` client that counts one round trip per command and per pipeline."""

    trips: RoundTrips

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.trips.count += 1
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = CountingPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.trips = self.trips
        return pipe


def connect(url: str, max_connections: int, *, plain_pool: bool = False) -> CountingRedis:
    """A counting client on a pool configured as `rsaga.connection.connect` does it.

    With `plain_pool`, on a default redis-py `ConnectionPool` instead, to see what
    rsaga's pool settings cost. Closing the client closes the pool.
    """
    pool = (
        ConnectionPool.from_url(url, max_connections=max_connections)
        if plain_pool
        else rsaga_connect(RedisSettings(url=url, max_connections=max_connections)).connection_pool
    )
    client = CountingRedis(connection_pool=pool)
    client.auto_close_connection_pool = True
    client.trips = RoundTrips()
    return client


# --- shared helpers -------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) of already sorted values, linearly interpolated."""
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


async def drive(
    op: Operation, concurrency: int, seconds: float, latencies: list[float] | None = None
) -> tuple[int, float]:
    """Run `op` in `concurrency` tasks until `seconds` have passed: (ops done, elapsed).

    A task starts no operation after the deadline; the ones in flight finish and
    count, and so does the time they take.
    """
    done = 0
    start = perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal done
        while True:
            began = perf_counter()
            if began >= deadline:
                return
            await op()
            if latencies is not None:
                latencies.append(perf_counter() - began)
            done += 1

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return done, perf_counter() - start


async def run_batch(
    fn: Callable[[int], Awaitable[Any]], count: int, concurrency: int = SETUP_CONCURRENCY
) -> None:
    """Call `fn(i)` for every i in range(count), `concurrency` calls at a time."""
    indexes = iter(range(count))

    async def worker() -> None:
        for i in indexes:
            await fn(i)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)


def account_id(n: int) -> str:
    return f"acct-{n}"


def random_pair(rng: random.Random, n: int) -> tuple[int, int]:
    """Two distinct numbers in range(n)."""
    a = rng.randrange(n)
    b = rng.randrange(n - 1)
    return a, b + (b >= a)


def version_of(page: list[tuple[bytes, Any]]) -> int:
    """A stream's version from an XRANGE page read from version 1 (short streams only)."""
    return int(page[-1][0].partition(b"-")[0]) if page else 0


def pre_encode(store: EventStore, event: msgspec.Struct) -> bytes:
    """An envelope for `event`, made once and sent many times by raw scenarios."""
    return store.codec.encode(
        event, event_id=uuid.uuid4().hex, occurred_at_ms=0, correlation_id="c", causation_id=None
    )


def commit_args(
    keyspace: Keyspace, writes: Sequence[tuple[str, int, Sequence[bytes]]]
) -> tuple[list[str], list[str | int | bytes]]:
    """KEYS and ARGV of commit.lua for (stream id, expected, envelopes) writes.

    The layout documented at the top of rsaga/lua/commit.lua, with no timeouts
    and no index updates.
    """
    keys = [keyspace.log(0), *(keyspace.stream(stream_id) for stream_id, _, _ in writes)]
    header: list[str | int | bytes] = [len(writes)]
    envelopes: list[str | bytes] = []
    for stream_id, expected, events in writes:
        header += [stream_id, expected, len(events)]
        for envelope in events:
            envelopes += [_type_of(envelope), envelope]
    return keys, header + envelopes


@functools.lru_cache(maxsize=1024)
def _type_of(envelope: bytes) -> str:
    """The event type named in an envelope (commit.lua puts it on the log as `t`)."""
    return str(msgspec.msgpack.decode(envelope)[1])


def check_commit_reply(reply: Any) -> None:
    """Fail loudly if commit.lua answered neither OK nor conflict (its layout changed?)."""
    if not isinstance(reply, list) or int(reply[0]) not in (0, -1):
        raise RuntimeError(f"commit.lua replied {reply!r}; has its argument layout changed?")


@dataclass
class Accounts:
    """A seeded set of account streams and the store they live in."""

    store: EventStore
    ids: list[str]


@dataclass
class Bench:
    """What a scenario gets: the client, its own key prefix, timings, shared fixtures."""

    redis: CountingRedis
    prefix: str
    duration: float
    warmup: float
    url: str = ""
    """The Redis URL, for subprocesses."""
    registry: EventRegistry = field(default_factory=lambda: EventRegistry(REGISTRY_TYPES))
    _accounts: dict[str, Accounts] = field(default_factory=dict)

    def keyspace(self, name: str) -> Keyspace:
        """A keyspace of the scenario's own, under the run's prefix."""
        return Keyspace(prefix=f"{self.prefix}.{name}")

    def store(self, name: str) -> EventStore:
        """An event store with a keyspace of its own, under the run's prefix."""
        return EventStore(self.redis, self.registry, keyspace=self.keyspace(name))

    async def commandstats(self) -> dict[str, int]:
        """Calls per command from INFO commandstats, INFO itself left out."""
        info: dict[str, Any] = await self.redis.info("commandstats")
        return {
            name: int(stats["calls"])
            for name, stats in info.items()
            if name != "cmdstat_info" and isinstance(stats, dict)
        }

    async def measure(
        self,
        op: Operation,
        concurrency: int,
        *,
        before_timed: Callable[[], None] | None = None,
    ) -> Metrics:
        """Warm up, then time `op` at `concurrency`: the standard throughput metrics."""
        await drive(op, concurrency, self.warmup)
        if before_timed is not None:
            before_timed()
        latencies: list[float] = []
        stats_before = await self.commandstats()
        trips_before = self.redis.trips.count
        cpu_before = time.process_time()
        ops, elapsed = await drive(op, concurrency, self.duration, latencies)
        cpu = time.process_time() - cpu_before
        trips = self.redis.trips.count - trips_before
        stats_after = await self.commandstats()
        server_cmds = sum(stats_after.values()) - sum(stats_before.values())
        latencies.sort()
        p50 = percentile(latencies, 0.50)
        p99 = percentile(latencies, 0.99)
        return {
            "ops": ops,
            "ops_per_s": round(ops / elapsed, 1),
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "round_trips_per_op": round(trips / ops, 3) if ops else None,
            "server_cmds_per_op": round(server_cmds / ops, 3) if ops else None,
            "cpu_us_per_op": round(cpu / ops * 1e6, 1) if ops else None,
        }

    async def accounts(self, name: str, count: int = ACCOUNTS, history: int = 1) -> Accounts:
        """`count` accounts of keyspace `name`, each a stream of `history` deposits.

        Seeded once per run and name; give each scenario a name of its own, so
        that what earlier scenarios wrote does not lengthen its streams.
        """
        if name not in self._accounts:
            store = self.store(name)
            ids = [account_id(n) for n in range(count)]
            events = [Deposited(INITIAL_BALANCE)] + [Deposited(1)] * (history - 1)

            async def seed(i: int) -> None:
                await store.append(ids[i], events, expected=ExpectedVersion.NO_STREAM)

            started = perf_counter()
            await run_batch(seed, len(ids))
            # Commands never read the shard log: do not keep a million entries of it.
            await self.redis.unlink(store.keyspace.log(0))
            progress(
                f"  seeded {count:,} accounts of {history} events"
                f" in {perf_counter() - started:.1f}s"
            )
            self._accounts[name] = Accounts(store, ids)
        return self._accounts[name]


# --- the scenario registry ------------------------------------------------------------

ScenarioFn = Callable[[Bench], Awaitable[Metrics]]


DEFAULT_TIMEOUT = 300.0
"""Seconds a scenario may run before it is stopped and reported as failed."""


@dataclass(frozen=True)
class Scenario:
    name: str
    fn: ScenarioFn
    doc: str
    ratios: dict[str, str]
    """Metric name -> baseline scenario: metric = our rate / the baseline's rate."""
    rate: str = "ops_per_s"
    """The metric ratios compare."""
    timeout: float = DEFAULT_TIMEOUT
    """Hard limit in seconds; past it the scenario is cancelled and reports an error."""


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str,
    *,
    ratios: dict[str, str] | None = None,
    doc: str | None = None,
    rate: str = "ops_per_s",
    timeout: float = DEFAULT_TIMEOUT,
    **params: Any,
) -> Callable[[Callable[..., Awaitable[Metrics]]], Callable[..., Awaitable[Metrics]]]:
    """Register the decorated function as scenario `name`, called with `params`.

    `doc` (default: the first line of the function's docstring) is what --list shows;
    `rate` names the metric ratios use; `timeout` bounds the scenario in seconds.

    Stack several decorators to register one function with several parameter sets.
    """

    def register(fn: Callable[..., Awaitable[Metrics]]) -> Callable[..., Awaitable[Metrics]]:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is registered twice")
        summary = doc or (fn.__doc__ or "").strip().partition("\n")[0]
        SCENARIOS[name] = Scenario(
            name, functools.partial(fn, **params), summary, ratios or {}, rate, timeout
        )
        return fn

    return register


def register_concurrencies(
    base: str, fn: Callable[..., Awaitable[Metrics]], ratios: dict[str, str] | None = None
) -> None:
    """Register `fn` as ``<base>_c<N>`` for each N in CONCURRENCIES.

    `ratios` values are baseline names without the ``_c<N>`` suffix.
    """
    for n in CONCURRENCIES:
        per_n = {metric: f"{baseline}_c{n}" for metric, baseline in (ratios or {}).items()}
        scenario(f"{base}_c{n}", ratios=per_n, concurrency=n)(fn)


# --- scenarios ------------------------------------------------------------------------

TRIVIAL_LUA = "return 1"


async def raw_evalsha(bench: Bench, *, concurrency: int) -> Metrics:
    """EVALSHA of `return 1` through redis-py asyncio: the client round-trip ceiling."""
    redis = bench.redis
    trivial = Script("trivial", TRIVIAL_LUA)
    await trivial.load(redis)

    async def op() -> None:
        await redis.evalsha(trivial.sha, 0)

    return await bench.measure(op, concurrency)


async def raw_commit(bench: Bench, *, concurrency: int) -> Metrics:
    """EVALSHA of commit.lua with one pre-encoded event: an append without rsaga's Python."""
    redis = bench.redis
    store = bench.store("rawcommit")
    commit = script("commit")
    await commit.load(redis)
    envelope = pre_encode(store, Deposited(1))
    keyspace = store.keyspace
    rng = random.Random(1)
    keys, args = commit_args(keyspace, [("probe", -1, [envelope])])
    check_commit_reply(await redis.evalsha(commit.sha, len(keys), *keys, *args))

    async def op() -> None:
        stream_id = account_id(rng.randrange(ACCOUNTS))
        keys, args = commit_args(keyspace, [(stream_id, -1, [envelope])])
        await redis.evalsha(commit.sha, len(keys), *keys, *args)

    return await bench.measure(op, concurrency)


async def raw_pipeline(bench: Bench, *, concurrency: int) -> Metrics:
    """Pipeline of 2 XRANGE, then EVALSHA commit.lua with 2 events: a command at the floor."""
    redis = bench.redis
    accounts = await bench.accounts(f"pipeline{concurrency}")
    keyspace = accounts.store.keyspace
    commit = script("commit")
    await commit.load(redis)
    withdrawn = [pre_encode(accounts.store, Withdrawn(1))]
    deposited = [pre_encode(accounts.store, Deposited(1))]
    rng = random.Random(2)

    async def op() -> None:
        a, b = random_pair(rng, len(accounts.ids))
        source, target = accounts.ids[a], accounts.ids[b]
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xrange(keyspace.stream(source), "1-0", "+", count=PAGE_SIZE)
            pipe.xrange(keyspace.stream(target), "1-0", "+", count=PAGE_SIZE)
            source_page, target_page = await pipe.execute()
        writes = [
            (source, version_of(source_page), withdrawn),
            (target, version_of(target_page), deposited),
        ]
        keys, args = commit_args(keyspace, writes)
        check_commit_reply(await redis.evalsha(commit.sha, len(keys), *keys, *args))

    return await bench.measure(op, concurrency)


async def append(bench: Bench, *, concurrency: int) -> Metrics:
    """EventStore.append of one small event, expected=ANY, to one of 10,000 streams."""
    store = bench.store("append")
    await script("commit").load(bench.redis)
    rng = random.Random(3)
    event = Deposited(1)

    async def op() -> None:
        await store.append(account_id(rng.randrange(ACCOUNTS)), [event])

    return await bench.measure(op, concurrency)


class CountingStore(EventStore):
    """An `EventStore` that counts the reads it serves and the events they return."""

    reads = 0
    events_read = 0

    async def read_streams(
        self,
        stream_ids: Sequence[str],
        *,
        from_version: int = 1,
        **more: Any,
    ) -> dict[str, StreamSlice]:
        # Older stores take no more than from_version (the before/after runs share this).
        found = await super().read_streams(stream_ids, from_version=from_version, **more)
        self.reads += 1
        self.events_read += sum(len(s.events) for s in found.values())
        return found


async def command(
    bench: Bench, *, concurrency: int, history: int = 1, count: int = ACCOUNTS
) -> Metrics:
    """Executor.execute of a Transfer between 2 of 10,000 accounts: read 2, fold, write 2."""
    accounts = await bench.accounts(
        f"command{concurrency}h{history}", count=count, history=history
    )
    store = CountingStore(bench.redis, bench.registry, keyspace=accounts.store.keyspace)
    executor = Executor(store)
    await script("commit").load(bench.redis)
    rng = random.Random(4)
    ids = accounts.ids
    counts = [0, 0]  # operations, attempts

    async def op() -> None:
        a, b = random_pair(rng, len(ids))
        result = await executor.execute(Transfer(source=StreamId(ids[a]), target=StreamId(ids[b])))
        counts[0] += 1
        counts[1] += result.attempts

    async def use(i: int) -> None:
        source, target = StreamId(ids[i]), StreamId(ids[(i + 1) % len(ids)])
        await executor.execute(Transfer(source=source, target=target))

    # Steady state: every account used once (snapshots written, the cache filled).
    await run_batch(use, len(ids))

    def reset() -> None:
        counts[:] = [0, 0]
        store.events_read = 0

    metrics = await bench.measure(op, concurrency, before_timed=reset)
    ops, attempts = counts
    events_read = store.events_read
    metrics["retries_per_op"] = round((attempts - ops) / ops, 4) if ops else None
    metrics["events_read_per_op"] = round(events_read / ops, 2) if ops else None
    return metrics


async def event_bytes(bench: Bench, *, events: int) -> Metrics:
    """Memory per small event: MEMORY USAGE of stream keys and shard log, used_memory delta."""
    redis = bench.redis
    store = bench.store("bytes")
    await script("commit").load(redis)
    event = Deposited(12_345)
    ids = [account_id(n) for n in range(events)]
    before = int((await redis.info("memory"))["used_memory"])

    async def write(i: int) -> None:
        await store.append(ids[i], [event])

    await run_batch(write, events)
    after = int((await redis.info("memory"))["used_memory"])

    stream_bytes = 0
    for start in range(0, events, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for stream_id in ids[start : start + 1000]:
                pipe.memory_usage(store.keyspace.stream(stream_id), samples=0)
            stream_bytes += sum(int(n or 0) for n in await pipe.execute())
    log_bytes = int(await redis.memory_usage(store.keyspace.log(0), samples=0) or 0)
    envelope = store.codec.encode(
        event,
        event_id=uuid.uuid4().hex,
        occurred_at_ms=0,
        correlation_id=uuid.uuid4().hex,
        causation_id=None,
    )
    return {
        "events": events,
        "envelope_bytes": len(envelope),
        "stream_bytes_per_event": round(stream_bytes / events, 1),
        "log_bytes_per_event": round(log_bytes / events, 1),
        "bytes_per_event": round((stream_bytes + log_bytes) / events, 1),
        "used_memory_per_event": round((after - before) / events, 1),
    }


register_concurrencies("raw_evalsha", raw_evalsha)
register_concurrencies("raw_commit", raw_commit, {"ratio_to_raw": "raw_evalsha"})
register_concurrencies("raw_pipeline", raw_pipeline, {"ratio_to_raw": "raw_evalsha"})
register_concurrencies(
    "append", append, {"ratio_to_raw": "raw_evalsha", "ratio_to_commit": "raw_commit"}
)
register_concurrencies(
    "command", command, {"ratio_to_raw": "raw_evalsha", "ratio_to_pipeline": "raw_pipeline"}
)
scenario(
    "command_len50_c32",
    ratios={"ratio_to_raw": "raw_evalsha_c32", "ratio_to_command": "command_c32"},
    concurrency=32,
    history=LONG_HISTORY,
    doc=f"command_c32 with account streams of {LONG_HISTORY} events: the cost of folding",
)(command)
scenario(
    "command_len1000_c32",
    ratios={"ratio_to_raw": "raw_evalsha_c32", "ratio_to_command": "command_c32"},
    concurrency=32,
    history=VERY_LONG_HISTORY,
    count=VERY_LONG_ACCOUNTS,
    timeout=600,
    doc=(
        f"command_c32 over {VERY_LONG_ACCOUNTS:,} account streams of {VERY_LONG_HISTORY:,}"
        " events each"
    ),
)(command)


async def contended(bench: Bench, *, concurrency: int, accounts: int) -> Metrics:
    """Transfers among 10 accounts by 64 tasks: does the rate hold as the streams grow?"""
    seconds = min(CONTENDED_SECONDS, 10 * bench.duration)
    keyspace = bench.keyspace(f"contended{concurrency}")
    store = CountingStore(bench.redis, bench.registry, keyspace=keyspace)
    ids = [account_id(n) for n in range(accounts)]
    for stream_id in ids:
        await store.append(stream_id, [Deposited(INITIAL_BALANCE)])
    executor = Executor(store)
    await script("commit").load(bench.redis)
    rng = random.Random(6)
    finished: list[float] = []
    counts = [0, 0, 0]  # commands done, attempts, commands that gave up

    async def op() -> None:
        a, b = random_pair(rng, accounts)
        try:
            result = await executor.execute(
                Transfer(source=StreamId(ids[a]), target=StreamId(ids[b]))
            )
        except RetriesExhausted as exc:
            counts[1] += exc.attempts
            counts[2] += 1
            return
        counts[0] += 1
        counts[1] += result.attempts
        finished.append(perf_counter())

    stats_before = await bench.commandstats()
    cpu = time.process_time()
    started = perf_counter()
    _, elapsed = await drive(op, concurrency, seconds)
    cpu = time.process_time() - cpu
    stats_after = await bench.commandstats()
    tenth = elapsed / 10
    first = sum(1 for t in finished if t - started < tenth) / tenth
    last = sum(1 for t in finished if t - started >= elapsed - tenth) / tenth
    ops, attempts, gave_up = counts
    versions = [await store.version(s) for s in ids]
    return {
        "seconds": round(elapsed, 1),
        "ops": ops,
        "ops_per_s": round(ops / elapsed, 1),
        "first_tenth_per_s": round(first, 1),
        "last_tenth_per_s": round(last, 1),
        "last_to_first": round(last / first, 3) if first else None,
        "gave_up": gave_up,
        "retries_per_op": round((attempts - ops) / ops, 3) if ops else None,
        "events_read_per_attempt": round(store.events_read / attempts, 1) if attempts else None,
        "server_cmds_per_op": round(
            (sum(stats_after.values()) - sum(stats_before.values())) / max(ops, 1), 2
        ),
        "cpu_us_per_op": round(cpu / max(ops, 1) * 1e6, 1),
        "final_stream_len": max(versions),
    }


scenario(
    "contended_c64",
    concurrency=CONTENDED_CONCURRENCY,
    accounts=CONTENDED_ACCOUNTS,
    timeout=600,
    doc=(
        f"{CONTENDED_CONCURRENCY} tasks transferring among {CONTENDED_ACCOUNTS} accounts"
        f" for 10 x --duration s (<= {CONTENDED_SECONDS:g}): first vs last tenth"
    ),
)(contended)
scenario("event_bytes", events=EVENT_BYTES_EVENTS)(event_bytes)


# --- worker, scheduler and process scenarios ------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
"""The repository: working directory of worker subprocesses (as `rsaga worker` in it)."""
PLUGINS_DIR = Path(__file__).resolve().parent
"""Where `plugins.py` lives: on the PYTHONPATH of worker subprocesses."""

APPEND_BATCH = 100
"""commit.lua calls per pipeline in `append_fast`."""
APPEND_CONCURRENCY = 4
HANDLER_EVENTS = 20_000
HANDLER_STREAMS = 2_000
HANDLER_WARMUP_EVENTS = 1_000
LATENCY_RATE = 1_000
"""Events per second appended while measuring handler latency."""
LATENCY_SECONDS = 2.0
RAW_GROUP_BATCH = 100
IDLE_TIMEOUTS = 200
IDLE_SPREAD = 4.0
LOADED_RATE = 10_000
LOADED_SECONDS = 3.0
CAPACITY_TIMEOUTS = 20_000
START_CONCURRENCY = 32
"""Concurrent process starts when scheduling timeouts in advance."""
DRAIN_TIMEOUTS = 100_000
E2E_ORDERS = 1_000
E2E_WARMUP_ORDERS = 50
E2E_WORKERS = 2
E2E_PACED_RATE = 20
"""Orders per second appended while measuring process duration."""
E2E_PACED_SECONDS = 3.0
E2E_GROUPS = ("order-fulfilment", "payment-service", "inventory-service", "shipping-service")
"""The handlers process_e2e runs (entry points of rsaga_examples.orders), so its log's groups."""
SAGA_TRIPS = 1_000
SAGA_WARMUP_TRIPS = 50
SAGA_WORKERS = 2
SAGA_FAILING = 0.3
"""Share of trips a service refuses (at a random step), so the saga compensates."""
SAGA_PACED_RATE = 20
"""Trips per second requested while measuring saga duration."""
SAGA_PACED_SECONDS = 3.0
SAGA_HANDLERS = {
    "travel-booking": "rsaga_examples.travel:TravelBooking",
    "hotel-service": "rsaga_examples.travel:HotelService",
    "flight-service": "rsaga_examples.travel:FlightService",
    "car-service": "rsaga_examples.travel:CarService",
}
"""The handlers saga_e2e runs (name -> import path, used if no entry point has the name)."""
POLL = 0.005
"""Seconds between polls of Redis for a condition being timed."""
WAIT_LIMIT = 120.0
"""Seconds any one wait for workers may take before the scenario fails."""


class ScenarioFailed(RuntimeError):
    """A scenario could not measure what it set out to (reported as its ``error``)."""


class Child:
    """One `rsaga worker` or `rsaga scheduler` subprocess, its output in a file."""

    def __init__(self, kind: str, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.kind = kind
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rsaga.cli", kind, *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def cpu_seconds(self) -> float | None:
        """User + system CPU the process used so far (Linux /proc; None elsewhere)."""
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def output(self, limit: int = 2000) -> str:
        """The last `limit` characters the process wrote."""
        return self.log_path.read_text(errors="replace")[-limit:]

    def kill(self) -> None:
        """SIGKILL (a no-op if it has exited); `reap` waits for it."""
        if self.process.poll() is None:
            self.process.kill()

    def reap(self) -> None:
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            progress(f"  rsaga {self.kind} (pid {self.process.pid}) survived SIGKILL for 10s")
        finally:
            self._log.close()


class Fleet:
    """The worker and scheduler subprocesses of one scenario; killed on exit, always.

    Each runs with ``RSAGA_REDIS_URL``, ``RSAGA_PREFIX`` and ``PYTHONPATH`` (with
    ``benchmarks/``) set and every other ``RSAGA_*`` variable of ours removed,
    in the repository (so ``config/rsaga.toml`` applies, as for `rsaga worker`).
    """

    def __init__(self, url: str, keyspace: Keyspace, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.keyspace = keyspace
        self.env = env or {}
        """More variables for every subprocess (a cluster's ``RSAGA_REDIS_CLUSTER``...)."""
        self.children: list[Child] = []
        self._dir = Path(tempfile.mkdtemp(prefix="rsaga-bench-"))

    def start(self, kind: str, *args: str, handlers: str | None = None) -> Child:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RSAGA_")}
        env.update(
            RSAGA_REDIS_URL=self.url,
            RSAGA_PREFIX=self.keyspace.prefix,
            RSAGA_LOG_LEVEL="WARNING",
            PYTHONPATH=os.pathsep.join(p for p in (str(PLUGINS_DIR), env.get("PYTHONPATH")) if p),
        )
        env.update(self.env)
        if handlers:
            env["RSAGA_HANDLERS"] = handlers
        if kind == "worker" and os.environ.get("BENCH_METRICS") and "--metrics-port" not in args:
            args = (*args, "--metrics-port", str(free_port()))
        log = self._dir / f"{kind}-{len(self.children)}.log"
        child = Child(kind, args, env, log)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Fail if any subprocess has exited."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                output = child.output(600).strip().replace("\n", " | ")
                raise ScenarioFailed(f"rsaga {child.kind} exited with {code}: {output}")

    async def wait(
        self,
        what: str,
        condition: Callable[[], Awaitable[bool]],
        *,
        timeout: float = WAIT_LIMIT,
        poll: float = POLL,
    ) -> None:
        """Poll `condition` until true; fail if a subprocess exits or `timeout` passes."""
        deadline = perf_counter() + timeout
        while not await condition():
            self.check()
            if perf_counter() > deadline:
                raise ScenarioFailed(f"timed out after {timeout:g}s waiting for {what}")
            await anyio.sleep(poll)

    async def ready(self, redis: Redis) -> float:
        """Wait until every subprocess has its heartbeat key; seconds since the first start."""
        began = perf_counter()

        async def all_beating() -> bool:
            return len(await live_heartbeats(redis, self.keyspace)) >= len(self.children)

        await self.wait("worker heartbeats", all_beating, poll=0.02)
        return perf_counter() - began

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for child in self.children:
            child.kill()
        for child in self.children:
            child.reap()
        if exc is not None:
            for child in self.children:
                progress(f"  --- rsaga {child.kind} output:\n{child.output()}")
        shutil.rmtree(self._dir, ignore_errors=True)


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(n) for n in stat.readline().split()[1:9]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


@dataclass
class Usage:
    """CPU seconds used so far by workers, schedulers, this process, Redis, the machine."""

    workers: float
    schedulers: float
    bench: float
    redis: float
    machine: tuple[float, float] | None
    wall: float
    commands: int
    """Commands the server ran (scripts' own calls included, INFO left out)."""
    scripts: int
    """EVALSHA calls."""

    @classmethod
    async def now(cls, redis: Redis, fleet: Fleet) -> Usage:
        cpu_info: dict[str, Any] = await redis.info("cpu")
        server = float(cpu_info["used_cpu_user"]) + float(cpu_info["used_cpu_sys"])
        stats: dict[str, Any] = await redis.info("commandstats")
        calls = {
            name: int(stat["calls"])
            for name, stat in stats.items()
            if name != "cmdstat_info" and isinstance(stat, dict)
        }

        def cpu(kind: str) -> float:
            return sum(c.cpu_seconds() or 0.0 for c in fleet.children if c.kind == kind)

        return cls(
            cpu("worker"), cpu("scheduler"), time.process_time(), server, machine_cpu(),
            perf_counter(), sum(calls.values()), calls.get("cmdstat_evalsha", 0),
        )

    def since(self, before: Usage, per: int) -> Metrics:
        """Per item: Redis commands, EVALSHA calls, CPU (µs); cores busy since `before`.

        ``machine_busy`` is the share of all the machine's cores that were busy.
        """
        wall = self.wall - before.wall
        workers, server = self.workers - before.workers, self.redis - before.redis
        out: Metrics = {
            "server_cmds": round((self.commands - before.commands) / per, 2),
            "scripts": round((self.scripts - before.scripts) / per, 2),
            "worker_cpu_us": round(workers / per * 1e6, 1),
            "redis_cpu_us": round(server / per * 1e6, 1),
            "worker_busy": round(workers / wall, 2),
            "redis_busy": round(server / wall, 2),
        }
        if self.schedulers:
            out["scheduler_busy"] = round((self.schedulers - before.schedulers) / wall, 2)
        out["bench_busy"] = round((self.bench - before.bench) / wall, 2)
        machine = None
        if self.machine and before.machine and self.machine[1] > before.machine[1]:
            busy = self.machine[0] - before.machine[0]
            machine = round(busy / (self.machine[1] - before.machine[1]), 2)
        out["machine_busy"] = machine
        return out


def ms_percentiles(values: list[float], prefix: str, max_too: bool = False) -> Metrics:
    """p50 and p99 (and max) of `values` in ms, as ``<prefix>_p50_ms`` and so on."""
    values = sorted(values)
    p50, p99 = percentile(values, 0.50), percentile(values, 0.99)
    out: Metrics = {
        f"{prefix}_p50_ms": None if p50 is None else round(p50, 2),
        f"{prefix}_p99_ms": None if p99 is None else round(p99, 2),
    }
    if max_too:
        out[f"{prefix}_max_ms"] = round(values[-1], 2) if values else None
    return out


async def append_fast(
    store: EventStore,
    items: Sequence[tuple[str, msgspec.Struct]],
    *,
    batch: int = APPEND_BATCH,
    concurrency: int = APPEND_CONCURRENCY,
) -> list[int]:
    """Append each (stream id, event) with expected=ANY: pipelines of commit.lua calls.

    The load generator of the worker scenarios, cheap enough not to be what limits
    them. Returns each event's occurred-at (ms).
    """
    commit = script("commit")
    await commit.load(store.redis)
    keyspace = store.keyspace
    occurred = [0] * len(items)

    async def send(chunk: int) -> None:
        start = chunk * batch
        now_ms = time.time_ns() // 1_000_000
        async with store.redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + batch, len(items))):
                stream_id, event = items[i]
                envelope = store.codec.encode(
                    event,
                    event_id=new_id(),
                    occurred_at_ms=now_ms,
                    correlation_id=new_id(),
                    causation_id=None,
                )
                keys, args = commit_args(keyspace, [(stream_id, -1, [envelope])])
                pipe.evalsha(commit.sha, len(keys), *keys, *args)
                occurred[i] = now_ms
            for reply in await pipe.execute():
                check_commit_reply(reply)

    await run_batch(send, -(-len(items) // batch), concurrency)
    return occurred


async def append_paced(
    store: EventStore, make: Callable[[int], tuple[str, msgspec.Struct]], rate: int, seconds: float
) -> list[int]:
    """Append `rate` events per second for `seconds` (ticks of >= 10 ms); their occurred-at."""
    tick = max(0.01, 1 / rate)
    per_tick = max(1, round(rate * tick))
    start = anyio.current_time()
    occurred: list[int] = []
    for n in range(round(seconds / tick)):
        first = len(occurred)
        occurred += await append_fast(store, [make(first + i) for i in range(per_tick)])
        await anyio.sleep(max(0.0, start + (n + 1) * tick - anyio.current_time()))
    return occurred


async def acknowledged(redis: Redis, stream: str, groups: Sequence[str]) -> bool:
    """Every group exists, has read `stream` to its end and has nothing pending."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xinfo_groups(stream)
        pipe.xrevrange(stream, count=1)
        infos, last = await pipe.execute()
    last_id = last[0][0] if last else b"0-0"
    by_name = {info["name"]: info for info in infos}
    for group in groups:
        info = by_name.get(group.encode())
        if info is None or info["pending"] or info["last-delivered-id"] != last_id:
            return False
    return True


async def raw_group(bench: Bench, *, events: int) -> Metrics:
    """XREADGROUP COUNT 100 + XACK per batch, one client: the floor of delivering events."""
    redis = bench.redis
    store = EventStore(redis, EventRegistry([Ping]), keyspace=bench.keyspace("rawgroup"))
    log = store.keyspace.log(0)
    envelope = pre_encode(store, Ping())

    async def seed(chunk: int) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(chunk * 1000, min((chunk + 1) * 1000, events)):
                pipe.xadd(log, {"s": f"s-{i % HANDLER_STREAMS}", "v": 1, "d": envelope})
            await pipe.execute()

    await run_batch(seed, -(-events // 1000), 4)
    await redis.xgroup_create(log, "raw", id="0")
    stats_before = await bench.commandstats()
    done = 0
    started = perf_counter()
    while True:
        reply: Any = await redis.xreadgroup("raw", "c", {log: ">"}, count=RAW_GROUP_BATCH)
        if not reply:
            break
        ids = [entry_id for entry_id, _ in reply[0][1]]
        await redis.xack(log, "raw", *ids)
        done += len(ids)
    elapsed = perf_counter() - started
    stats_after = await bench.commandstats()
    if done != events:
        raise ScenarioFailed(f"read {done} of {events} entries")
    return {
        "events": events,
        "events_per_s": round(events / elapsed, 1),
        "server_cmds_per_event": round(
            (sum(stats_after.values()) - sum(stats_before.values())) / events, 3
        ),
    }


HANDLERS = {"noop": ("NoopHandler", "bench-noop"), "command": ("CommandHandler", "bench-command")}


async def handler_throughput(
    bench: Bench, *, kind: str, workers: int, metrics: bool = False
) -> Metrics:
    """Events/s from append to acknowledged through `workers` real `rsaga worker` processes.

    With `metrics`, each worker also serves Prometheus metrics (`--metrics-port`).
    """
    class_name, group = HANDLERS[kind]
    redis = bench.redis
    keyspace = bench.keyspace(f"{kind}{workers}{'m' if metrics else ''}")
    store = EventStore(redis, EventRegistry([Ping, Seen]), keyspace=keyspace)
    streams = [f"s-{n}" for n in range(HANDLER_STREAMS)]

    def ping(i: int, sample: bool = False) -> tuple[str, msgspec.Struct]:
        return streams[i % len(streams)], Ping(sample)

    def done() -> Awaitable[bool]:
        return acknowledged(redis, keyspace.log(0), [group])

    with Fleet(bench.url, keyspace) as fleet:
        for _ in range(workers):
            extra = ("--metrics-port", str(free_port())) if metrics else ()
            fleet.start("worker", "--handler", group, *extra, handlers=f"plugins:{class_name}")
        startup = await fleet.ready(redis)
        await append_fast(store, [ping(i) for i in range(HANDLER_WARMUP_EVENTS)])
        await fleet.wait("the warm-up events", done)

        before = await Usage.now(redis, fleet)
        started = perf_counter()
        await append_fast(store, [ping(i) for i in range(HANDLER_EVENTS)])
        append_s = perf_counter() - started
        await fleet.wait("every event acknowledged", done)
        elapsed = perf_counter() - started
        usage = (await Usage.now(redis, fleet)).since(before, HANDLER_EVENTS)

        paced = len(
            await append_paced(store, lambda i: ping(i, sample=True), LATENCY_RATE, LATENCY_SECONDS)
        )
        await fleet.wait("the paced events", done)
        fleet.check()
    samples = [float(v) for v in await redis.lrange(latency_key(keyspace.prefix), 0, -1)]
    if len(samples) != paced:
        raise ScenarioFailed(f"{len(samples)} latency samples for {paced} paced events")
    if kind == "command":
        total = HANDLER_WARMUP_EVENTS + HANDLER_EVENTS + paced
        async with redis.pipeline(transaction=False) as pipe:
            for stream_id in streams:
                pipe.xlen(keyspace.stream(f"seen-{stream_id}"))
            recorded = sum(int(n) for n in await pipe.execute())
        if recorded != total:
            raise ScenarioFailed(f"{recorded} Seen events recorded for {total} events handled")
    return {
        "events": HANDLER_EVENTS,
        "startup_s": round(startup, 2),
        "append_s": round(append_s, 2),
        "events_per_s": round(HANDLER_EVENTS / elapsed, 1),
        **usage,
        "lat_rate": LATENCY_RATE,
        **ms_percentiles(samples, "lat"),
    }


async def timeout_lateness(
    bench: Bench, *, count: int, spread: float, workers: int = 1
) -> Metrics:
    """Lateness of `count` timeouts due over `spread` s: scheduler + worker + process step."""
    redis = bench.redis
    keyspace = bench.keyspace(f"timer{count}w{workers}")
    store = EventStore(redis, EventRegistry(), keyspace=keyspace)
    runner = ProcessRunner(Executor(store), [TimerProbe()])
    probe = TimerProbe.name
    server: dict[str, Any] = await redis.info("server")
    hz = int(server["hz"])

    async def start_all(prefix: str, due: Callable[[int], int], n: int) -> None:
        async def start(i: int) -> None:
            await runner.start(probe, f"{prefix}{i}", due(i))

        await run_batch(start, n, START_CONCURRENCY)

    async def completed() -> int:
        return int(await redis.hget(keyspace.process_stats(0, probe), "completed") or 0)

    with Fleet(bench.url, keyspace) as fleet:
        for _ in range(workers):
            fleet.start("worker", "--handler", probe, handlers="plugins:TimerProbe")
        fleet.start("scheduler")
        startup = await fleet.ready(redis)

        # Calibrate: how fast can processes be started (their timeouts are an hour off)?
        calibration = min(500, count)
        far = time.time_ns() // 1_000_000 + 3_600_000
        began = perf_counter()
        await start_all("cal-", lambda i: far, calibration)
        rate = calibration / (perf_counter() - began)
        lead = 1.0 + 1.5 * count / rate
        first_due = time.time_ns() // 1_000_000 + round(lead * 1000)
        step_ms = spread * 1000 / count

        began = perf_counter()
        await start_all("p", lambda i: first_due + int(i * step_ms), count)
        await fleet.wait(
            "the worker to catch up with the log",
            lambda: acknowledged(redis, keyspace.log(0), [probe]),
        )
        setup_s = perf_counter() - began
        margin_ms = first_due - time.time_ns() // 1_000_000
        if margin_ms < 200:
            raise ScenarioFailed(f"setup overran the first due time ({margin_ms} ms to spare)")
        await anyio.sleep((first_due - time.time_ns() // 1_000_000) / 1000 - 0.05)
        before = await Usage.now(redis, fleet)
        # Quiet until the last timeout is due: our own requests would wake Redis.
        await anyio.sleep((first_due - time.time_ns() // 1_000_000) / 1000 + spread + 0.05)

        async def all_fired() -> bool:
            return await completed() >= count

        await fleet.wait("every timeout to fire", all_fired, poll=0.02)
        done_ms = time.time_ns() // 1_000_000
        usage = (await Usage.now(redis, fleet)).since(before, count)
        fleet.check()

    lateness: list[float] = []
    ids = [TimerProbe.stream_id(f"p{i}") for i in range(count)]
    for chunk in range(0, count, 1000):
        slices = await store.read_streams(ids[chunk : chunk + 1000])
        for stream in slices.values():
            lateness += [e.data.lateness_ms for e in stream.events if isinstance(e.data, Fired)]
    if len(lateness) != count:
        raise ScenarioFailed(f"{len(lateness)} of {count} probes recorded their firing")
    moves: list[float] = []
    after = "-"
    while True:
        page: Any = await redis.xrange(keyspace.due_timeouts(0), after, "+", count=10_000)
        for entry_id, fields in page:
            probe = decode_timeout(fields[b"p"])
            if probe.name == PROBE_TIMEOUT and b"cal-" not in fields[b"s"]:
                moves.append(int(entry_id.partition(b"-")[0]) - float(fields[b"due"]))
        if len(page) < 10_000:
            break
        after = f"({page[-1][0].decode()}"
    return {
        "timeouts": count,
        "workers": workers,
        "redis_hz": hz,
        "startup_s": round(startup, 2),
        "setup_s": round(setup_s, 2),
        **ms_percentiles(lateness, "late", max_too=True),
        **ms_percentiles(moves, "move", max_too=True),
        "fired_per_s": round(count / max(spread, (done_ms - first_due) / 1000), 1),
        **usage,
    }


async def timeout_capacity(bench: Bench, *, count: int) -> Metrics:
    """Process steps/s one worker sustains from a due stream already full of timeouts."""
    redis = bench.redis
    keyspace = bench.keyspace("capacity")
    store = EventStore(redis, EventRegistry(), keyspace=keyspace)
    runner = ProcessRunner(Executor(store), [TimerProbe()])
    probe = TimerProbe.name
    # Due at once but not before every process has started: drained by this process.
    due_ms = time.time_ns() // 1_000_000 + 1

    async def start(i: int) -> None:
        await runner.start(probe, f"c{i}", due_ms)

    async def completed() -> bool:
        done = int(await redis.hget(keyspace.process_stats(0, probe), "completed") or 0)
        return done >= count

    with Fleet(bench.url, keyspace) as fleet:
        fleet.start("worker", "--handler", probe, handlers="plugins:TimerProbe")
        startup = await fleet.ready(redis)
        began = perf_counter()
        await run_batch(start, count, START_CONCURRENCY)
        await fleet.wait(
            "the worker to catch up with the log",
            lambda: acknowledged(redis, keyspace.log(0), [probe]),
        )
        setup_s = perf_counter() - began
        before = await Usage.now(redis, fleet)
        started = perf_counter()
        moved = await Scheduler(redis, keyspace).drain(0)
        move_s = perf_counter() - started
        if moved != count:
            raise ScenarioFailed(f"moved {moved} of {count} timeouts")
        await fleet.wait("every timeout to fire", completed, poll=0.02)
        elapsed = perf_counter() - started
        usage = (await Usage.now(redis, fleet)).since(before, count)
        fleet.check()
    return {
        "timeouts": count,
        "startup_s": round(startup, 2),
        "setup_s": round(setup_s, 2),
        "move_s": round(move_s, 3),
        "steps_per_s": round(count / elapsed, 1),
        **usage,
    }


MEMORY_PROCESSES = 300
"""Orders memory_per_process runs to the end, and as many it leaves waiting."""


async def key_bytes(redis: Redis, keyspace: Keyspace, skip: Sequence[str]) -> int:
    """MEMORY USAGE (SAMPLES 0) summed over every key of `keyspace` but those in `skip`."""
    keys = [
        k async for k in redis.scan_iter(match=f"{keyspace.prefix}:*", count=10_000)
        if k.decode() not in skip
    ]
    total = 0
    for start in range(0, len(keys), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys[start : start + 1000]:
                pipe.memory_usage(key, samples=0)
            total += sum(int(n or 0) for n in await pipe.execute())
    return total


async def memory_phase(bench: Bench, phase: str, groups: Sequence[str], orders: int) -> Metrics:
    """Bytes per order `orders` orders add, run by a worker with `groups` and a scheduler."""
    redis = bench.redis
    keyspace = bench.keyspace(f"mem{phase}")
    store = EventStore(redis, EventRegistry([OrderPlaced]), keyspace=keyspace)
    process = groups[0]
    # Finished orders count as "completed"; with no services running, orders wait.
    field = "completed" if phase == "finished" else "started"
    # Delivery channels, trimmed once read: reported apart.
    channels = [keyspace.log(0), keyspace.due_timeouts(0)]

    async def reached(n: int) -> bool:
        return int(await redis.hget(keyspace.process_stats(0, process), field) or 0) >= n

    def log_read() -> Awaitable[bool]:
        return acknowledged(redis, keyspace.log(0), groups)

    async def sizes() -> tuple[int, int, int]:
        used = int((await redis.info("memory"))["used_memory"])
        log = int(await redis.memory_usage(keyspace.log(0), samples=0) or 0)
        return await key_bytes(redis, keyspace, channels), log, used

    with Fleet(bench.url, keyspace) as fleet:
        fleet.start("worker", *(arg for group in groups for arg in ("--handler", group)))
        fleet.start("scheduler")
        await fleet.ready(redis)
        warm = [(f"order-w{i}", OrderPlaced(f"w{i}", 100)) for i in range(E2E_WARMUP_ORDERS)]
        await append_fast(store, warm)
        await fleet.wait("the warm-up orders", lambda: reached(E2E_WARMUP_ORDERS))
        await fleet.wait("the log read", log_read)
        before = await sizes()
        await append_fast(store, [(f"order-{i}", OrderPlaced(str(i), 100)) for i in range(orders)])
        await fleet.wait(
            "the orders", lambda: reached(E2E_WARMUP_ORDERS + orders), timeout=3 * WAIT_LIMIT
        )
        await fleet.wait("the log read", log_read)
        after = await sizes()
        fleet.check()
    keys, log, used = (round((a - b) / orders) for a, b in zip(after, before, strict=True))
    return {f"{phase}_bytes": keys, f"{phase}_log_bytes": log, f"{phase}_used_memory": used}


async def memory_per_process(bench: Bench, *, orders: int) -> Metrics:
    """Bytes in Redis per finished and per active order-fulfilment process."""
    return {
        "orders": orders,
        **await memory_phase(bench, "finished", E2E_GROUPS, orders),
        # Only the process runs: every order waits for its payment.
        **await memory_phase(bench, "active", E2E_GROUPS[:1], orders),
    }


RAW_XADD_LUA = """
for i = 1, tonumber(ARGV[1]) do
  redis.call('XADD', KEYS[1], '*', 's', ARGV[2], 't', ARGV[3], 'p', ARGV[4], 'due', ARGV[5])
end
return tonumber(ARGV[1])
"""


async def timeout_drain(bench: Bench, *, count: int) -> Metrics:
    """Scheduler.drain of 100,000 due timeouts onto the due stream, vs a raw XADD loop."""
    redis = bench.redis
    keyspace = bench.keyspace("drain")
    zset, data, due = keyspace.timeouts(0), keyspace.timeout_data(0), keyspace.due_timeouts(0)
    past = time.time_ns() // 1_000_000 - 3_600_000
    encoder = msgspec.msgpack.Encoder()

    def payload(i: int) -> tuple[str, int, bytes]:
        process_id = f"p{i}"
        body = TimeoutPayload(
            TimerProbe.name, process_id, PROBE_TIMEOUT, new_id(), 1, past + i // 100
        )
        member = timeout_id(TimerProbe.stream_id(process_id), PROBE_TIMEOUT)
        return member, body.due_ms, encoder.encode(body)

    async def seed(chunk: int) -> None:
        rows = [payload(i) for i in range(chunk * 1000, min((chunk + 1) * 1000, count))]
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zadd(zset, {member: due_ms for member, due_ms, _ in rows})
            pipe.hset(data, mapping={member: blob for member, _, blob in rows})
            await pipe.execute()

    await run_batch(seed, -(-count // 1000), 4)
    scheduler = Scheduler(redis, keyspace)
    await script("move_due_timeouts").load(redis)
    info: dict[str, Any] = await redis.info("cpu")
    cpu_before = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    started = perf_counter()
    moved = await scheduler.drain(0)
    elapsed = perf_counter() - started
    info = await redis.info("cpu")
    cpu = float(info["used_cpu_user"]) + float(info["used_cpu_sys"]) - cpu_before
    on_stream = int(await redis.xlen(due))
    if moved != count or on_stream != count or await redis.zcard(zset):
        raise ScenarioFailed(f"moved {moved}, {on_stream} on the due stream, of {count}")

    raw = Script("raw_xadd", RAW_XADD_LUA)
    await raw.load(redis)
    raw_key = keyspace.due_timeouts(0) + "-raw"
    member, due_ms, blob = payload(0)
    started = perf_counter()
    for _ in range(count // scheduler.batch_size):
        await raw(
            redis, [raw_key], [scheduler.batch_size, member.partition("|")[0], member, blob, due_ms]
        )
    raw_elapsed = perf_counter() - started
    return {
        "timeouts": count,
        "timeouts_per_s": round(count / elapsed, 1),
        "redis_cpu_us": round(cpu / count * 1e6, 2),
        "raw_per_s": round(count // scheduler.batch_size * scheduler.batch_size / raw_elapsed, 1),
        "ratio_to_raw": round(raw_elapsed / elapsed, 3),
    }


async def process_e2e(bench: Bench, *, orders: int, workers: int) -> Metrics:
    """Order fulfilments completed per second: 2 workers with every handler, 1 scheduler."""
    redis = bench.redis
    keyspace = bench.keyspace("e2e")
    registry = EventRegistry([OrderPlaced, *FRAMEWORK_EVENTS])
    store = EventStore(redis, registry, keyspace=keyspace)
    process = "order-fulfilment"
    stats = keyspace.process_stats(0, process)

    async def count(field: str) -> int:
        return int(await redis.hget(stats, field) or 0)

    def order(order_id: str) -> tuple[str, msgspec.Struct]:
        return f"order-{order_id}", OrderPlaced(order_id, 100)

    async def durations(order_ids: Sequence[str], placed_ms: Sequence[int]) -> list[float]:
        """Milliseconds from each OrderPlaced to its process's ProcessCompleted."""
        out: list[float] = []
        for chunk in range(0, len(order_ids), 1000):
            ids = order_ids[chunk : chunk + 1000]
            async with redis.pipeline(transaction=False) as pipe:
                for order_id in ids:
                    pipe.xrevrange(keyspace.stream(f"{process}-{order_id}"), count=1)
                pages = await pipe.execute()
            for n, (order_id, page) in enumerate(zip(ids, pages, strict=True)):
                entry_id, fields = page[0]
                version = int(entry_id.partition(b"-")[0])
                last = store.codec.decode(f"{process}-{order_id}", version, fields[b"d"])
                if not isinstance(last.data, ProcessCompleted):
                    raise ScenarioFailed(f"order {order_id} ended with {last.type}")
                out.append(last.occurred_at.timestamp() * 1000 - placed_ms[chunk + n])
        return out

    with Fleet(bench.url, keyspace) as fleet:
        handlers = [arg for group in E2E_GROUPS for arg in ("--handler", group)]
        for _ in range(workers):
            fleet.start("worker", *handlers)
        fleet.start("scheduler")
        startup = await fleet.ready(redis)

        async def completed(n: int) -> bool:
            if await count("failed"):
                raise ScenarioFailed(f"{await count('failed')} order processes failed")
            return await count("completed") >= n

        def drained() -> Awaitable[bool]:
            return acknowledged(redis, keyspace.log(0), E2E_GROUPS)

        await append_fast(store, [order(f"w{i}") for i in range(E2E_WARMUP_ORDERS)])
        await fleet.wait("the warm-up orders", lambda: completed(E2E_WARMUP_ORDERS))
        log_before = int(await redis.xlen(keyspace.log(0)))
        before = await Usage.now(redis, fleet)
        started = perf_counter()
        burst = [str(i) for i in range(orders)]
        burst_ms = await append_fast(store, [order(i) for i in burst])
        append_s = perf_counter() - started
        total = E2E_WARMUP_ORDERS + orders
        await fleet.wait("every order completed", lambda: completed(total), poll=0.01)
        elapsed = perf_counter() - started
        usage = (await Usage.now(redis, fleet)).since(before, orders)
        # Finished processes get no more events: the log grew by exactly the burst's.
        log_entries = int(await redis.xlen(keyspace.log(0))) - log_before
        await fleet.wait("every group to read the whole log", drained, poll=0.01)
        drained_s = perf_counter() - started

        paced_ms = await append_paced(
            store, lambda i: order(f"p{i}"), E2E_PACED_RATE, E2E_PACED_SECONDS
        )
        paced = [f"p{i}" for i in range(len(paced_ms))]
        total += len(paced)
        await fleet.wait("the paced orders", lambda: completed(total), poll=0.01)
        fleet.check()
    return {
        "orders": orders,
        "startup_s": round(startup, 2),
        "append_s": round(append_s, 2),
        "processes_per_s": round(orders / elapsed, 1),
        "drained_s": round(drained_s, 2),
        **ms_percentiles(await durations(burst, burst_ms), "burst"),
        "log_entries_per_process": round(log_entries / orders, 1),
        **usage,
        "dur_rate": E2E_PACED_RATE,
        **ms_percentiles(await durations(paced, paced_ms), "dur"),
    }


def handler_args(names: dict[str, str]) -> tuple[list[str], str | None]:
    """``--handler`` flags for `names`, and RSAGA_HANDLERS for those no entry point installs.

    `names` maps handler name -> import path. Workers run in the repository, so
    its own package metadata counts as well as the environment's.
    """
    installed = {
        ep.name
        for dist in importlib.metadata.distributions(path=[str(ROOT), *sys.path])
        for ep in dist.entry_points
        if ep.group == "rsaga.handlers"
    }
    missing = [path for name, path in names.items() if name not in installed]
    return [arg for name in names for arg in ("--handler", name)], ",".join(missing) or None


async def saga_e2e(bench: Bench, *, trips: int, workers: int, failing: float) -> Metrics:
    """Travel-booking sagas finished per second: 2 workers with every handler, 1 scheduler."""
    redis = bench.redis
    keyspace = bench.keyspace("saga")
    registry = EventRegistry([*TRAVEL_EVENTS, *FRAMEWORK_EVENTS, *SAGA_EVENTS])
    store = EventStore(redis, registry, keyspace=keyspace)
    saga = "travel-booking"
    stats = keyspace.process_stats(0, saga)
    rng = random.Random(5)
    fail_at: dict[str, str | None] = {}
    """Trip id -> the service set to refuse it (None: every service books)."""

    def plan(prefix: str, n: int) -> list[tuple[str, msgspec.Struct]]:
        """`n` trip requests, round(n * failing) of them refused at a random step."""
        refused = set(rng.sample(range(n), round(n * failing)))
        out: list[tuple[str, msgspec.Struct]] = []
        for i in range(n):
            trip_id = f"{prefix}{i}"
            fail_at[trip_id] = rng.choice(SERVICES) if i in refused else None
            out.append((f"trip-{trip_id}", TripRequested(trip_id, fail_at=fail_at[trip_id])))
        return out

    async def lifecycle() -> tuple[int, int]:
        """(completed, compensated) sagas so far; a failed saga fails the scenario."""
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hget(stats, "completed")
            pipe.hget(stats, "compensated")
            pipe.hget(stats, "failed")
            completed, compensated, failed = await pipe.execute()
        if int(failed or 0):
            raise ScenarioFailed(f"{int(failed)} sagas failed (a compensation failed?)")
        return int(completed or 0), int(compensated or 0)

    def finished(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return sum(await lifecycle()) >= n

        return check

    async def durations(
        trip_ids: Sequence[str], requested_ms: Sequence[int]
    ) -> tuple[list[float], list[float]]:
        """Per trip, ms from ProcessStarted and from TripRequested to the saga's last event.

        Checks that each saga ended as planned: completed, or compensated.
        """
        own: list[float] = []
        total: list[float] = []
        for chunk in range(0, len(trip_ids), 500):
            ids = trip_ids[chunk : chunk + 500]
            async with redis.pipeline(transaction=False) as pipe:
                for trip_id in ids:
                    key = keyspace.stream(f"{saga}-{trip_id}")
                    pipe.xrange(key, count=1)
                    pipe.xrevrange(key, count=1)
                pages = await pipe.execute()
            for n, trip_id in enumerate(ids):
                stream_id = f"{saga}-{trip_id}"
                first, last = (
                    store.codec.decode(stream_id, int(entry_id.partition(b"-")[0]), fields[b"d"])
                    for entry_id, fields in (pages[2 * n][0], pages[2 * n + 1][0])
                )
                if not isinstance(first.data, ProcessStarted):
                    raise ScenarioFailed(f"saga {stream_id} begins with {first.type}")
                refused = fail_at[trip_id]
                ok = (
                    isinstance(last.data, ProcessCompleted)
                    if refused is None
                    else isinstance(last.data, ProcessCompensated)
                    and last.data.reason.startswith(f"{refused} failed")
                )
                if not ok:
                    raise ScenarioFailed(
                        f"saga {stream_id} (refused at {refused}) ended with {last.type}"
                    )
                end_ms = last.occurred_at.timestamp() * 1000
                own.append(end_ms - first.occurred_at.timestamp() * 1000)
                total.append(end_ms - requested_ms[chunk + n])
        return own, total

    args, handlers = handler_args(SAGA_HANDLERS)
    with Fleet(bench.url, keyspace) as fleet:
        for _ in range(workers):
            fleet.start("worker", *args, handlers=handlers)
        fleet.start("scheduler")
        startup = await fleet.ready(redis)

        def drained() -> Awaitable[bool]:
            return acknowledged(redis, keyspace.log(0), list(SAGA_HANDLERS))

        await append_fast(store, plan("w", SAGA_WARMUP_TRIPS))
        await fleet.wait("the warm-up sagas", finished(SAGA_WARMUP_TRIPS))
        log_before = int(await redis.xlen(keyspace.log(0)))
        before = await Usage.now(redis, fleet)
        started = perf_counter()
        burst = plan("b", trips)
        burst_ms = await append_fast(store, burst)
        append_s = perf_counter() - started
        total = SAGA_WARMUP_TRIPS + trips
        await fleet.wait("every saga finished", finished(total), poll=0.01)
        elapsed = perf_counter() - started
        usage = (await Usage.now(redis, fleet)).since(before, trips)
        log_entries = int(await redis.xlen(keyspace.log(0))) - log_before
        await fleet.wait("every group to read the whole log", drained, poll=0.01)
        drained_s = perf_counter() - started
        completed, compensated = await lifecycle()

        paced_plan = plan("p", round(SAGA_PACED_RATE * SAGA_PACED_SECONDS * 2))
        paced_ms = await append_paced(
            store, paced_plan.__getitem__, SAGA_PACED_RATE, SAGA_PACED_SECONDS
        )
        paced = [f"p{i}" for i in range(len(paced_ms))]
        total += len(paced)
        await fleet.wait("the paced sagas", finished(total), poll=0.01)
        fleet.check()
    burst_ids = [f"b{i}" for i in range(trips)]
    refused = sum(fail_at[t] is not None for t in burst_ids) + sum(
        fail_at[f"w{i}"] is not None for i in range(SAGA_WARMUP_TRIPS)
    )
    if compensated != refused or completed != SAGA_WARMUP_TRIPS + trips - refused:
        raise ScenarioFailed(
            f"{completed} completed and {compensated} compensated; {refused} were refused"
        )
    burst_own, burst_total = await durations(burst_ids, burst_ms)
    paced_own, paced_total = await durations(paced, paced_ms)
    return {
        "trips": trips,
        "compensated": sum(fail_at[t] is not None for t in burst_ids),
        "startup_s": round(startup, 2),
        "append_s": round(append_s, 2),
        "sagas_per_s": round(trips / elapsed, 1),
        "drained_s": round(drained_s, 2),
        **ms_percentiles(burst_own, "saga"),
        **ms_percentiles(burst_total, "burst"),
        "log_entries_per_saga": round(log_entries / trips, 1),
        **usage,
        "dur_rate": SAGA_PACED_RATE,
        **ms_percentiles(paced_total, "dur"),
        **ms_percentiles(paced_own, "dur_saga"),
    }


scenario("raw_group", rate="events_per_s", events=HANDLER_EVENTS)(raw_group)
for _kind in HANDLERS:
    for _workers in (1, 2):
        _ratios = {"ratio_to_raw": "raw_group"}
        if _kind == "command":
            _ratios["ratio_to_noop"] = f"handler_noop_p{_workers}"
        if _workers > 1:
            _ratios["ratio_to_p1"] = f"handler_{_kind}_p1"
        scenario(
            f"handler_{_kind}_p{_workers}",
            ratios=_ratios,
            rate="events_per_s",
            timeout=180,
            doc=f"{_kind} handler, {_workers} worker process(es): events/s append to ack",
            kind=_kind,
            workers=_workers,
        )(handler_throughput)
scenario(
    "handler_command_metrics_p1",
    ratios={"ratio_to_metrics_off": "handler_command_p1"},
    rate="events_per_s",
    timeout=180,
    doc="handler_command_p1 with Prometheus metrics on (target: within 10% of off)",
    kind="command",
    workers=1,
    metrics=True,
)(handler_throughput)
scenario(
    "timeout_lateness_idle",
    rate="fired_per_s",
    timeout=120,
    doc=f"lateness of {IDLE_TIMEOUTS} timeouts due over {IDLE_SPREAD:g}s at idle",
    count=IDLE_TIMEOUTS,
    spread=IDLE_SPREAD,
)(timeout_lateness)
scenario(
    "timeout_lateness_loaded",
    rate="fired_per_s",
    timeout=300,
    doc=f"lateness of {LOADED_RATE:,} timeouts due per second for {LOADED_SECONDS:g}s",
    count=round(LOADED_RATE * LOADED_SECONDS),
    spread=LOADED_SECONDS,
)(timeout_lateness)
scenario(
    "timeout_lateness_loaded_w2",
    rate="fired_per_s",
    timeout=300,
    doc="timeout_lateness_loaded with 2 worker processes",
    count=round(LOADED_RATE * LOADED_SECONDS),
    spread=LOADED_SECONDS,
    workers=2,
)(timeout_lateness)
scenario(
    "timeout_capacity",
    rate="steps_per_s",
    timeout=300,
    doc=f"process steps/s one worker sustains from {CAPACITY_TIMEOUTS:,} due timeouts",
    count=CAPACITY_TIMEOUTS,
)(timeout_capacity)
scenario(
    "memory_per_process",
    timeout=300,
    doc=f"bytes in Redis per finished and per active order process ({MEMORY_PROCESSES:,} each)",
    orders=MEMORY_PROCESSES,
)(memory_per_process)
scenario("timeout_drain", rate="timeouts_per_s", timeout=180, count=DRAIN_TIMEOUTS)(
    timeout_drain
)
scenario(
    "process_e2e",
    rate="processes_per_s",
    timeout=300,
    orders=E2E_ORDERS,
    workers=E2E_WORKERS,
)(process_e2e)
scenario(
    "saga_e2e",
    rate="sagas_per_s",
    timeout=300,
    doc=(
        f"travel-booking sagas finished per second, {SAGA_FAILING:.0%} compensated,"
        f" {SAGA_WORKERS} workers"
    ),
    trips=SAGA_TRIPS,
    workers=SAGA_WORKERS,
    failing=SAGA_FAILING,
)(saga_e2e)


# --- running --------------------------------------------------------------------------


# --- Redis Cluster ----------------------------------------------------------------------
#
# Each of these starts its own private Redis: a cluster of 3 masters (`cluster_*`,
# `replicated_*` with a replica each) or one server (`sharded_*`, the same scenario on
# one node in the same run), both with store.shards = 8, so ``ratio_to_node`` is what
# routing over a cluster costs on this machine. ``redis_cpu_us`` is the servers' CPU
# per operation, ``redis_cpu_us_m<i>`` each master's share (spread over the masters
# is the point of a cluster); ``client_cpu_us`` this process's CPU per operation.

CLUSTER_SHARDS = 8
CLUSTER_MASTERS = 3
CLUSTER_ACCOUNTS = 2_000
CLUSTER_E2E_ORDERS = 300
"""Fewer than process_e2e's 1,000: on a loaded 2-core machine a burst of 1,000 over 8
shards outlasts the example's 10-s service timeouts and orders fail."""


@contextmanager
def private_redis(cluster: bool, replicas: int = 0) -> Iterator[tuple[str, list[int]]]:
    """(url, the masters' ports) of a private cluster of 3 masters, or of one server."""
    if cluster:
        with RedisClusterNodes(CLUSTER_MASTERS, replicas) as nodes:
            yield nodes.url, nodes.master_ports()
    else:
        with RedisServer() as server:
            yield server.url, [server.port]


async def servers_cpu(ports: Sequence[int]) -> list[float]:
    """CPU seconds (user + sys) each server on `ports` has used so far."""
    used: list[float] = []
    for port in ports:
        client = Redis(host="127.0.0.1", port=port)
        try:
            info: dict[str, Any] = await client.info("cpu")
        finally:
            await client.aclose()
        used.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
    return used


def cpu_metrics(before: list[float], after: list[float], client: float, per: int) -> Metrics:
    spent = [b - a for a, b in zip(before, after, strict=True)]
    out: Metrics = {
        "redis_cpu_us": round(sum(spent) / per * 1e6, 1),
        "client_cpu_us": round(client / per * 1e6, 1),
    }
    if len(spent) > 1:
        out.update({f"redis_cpu_us_m{i}": round(x / per * 1e6, 1) for i, x in enumerate(spent)})
    return out


def sharded_store(redis: Redis, prefix: str, registry: EventRegistry, **options: Any) -> EventStore:
    keyspace = Keyspace(prefix=prefix, shards=CLUSTER_SHARDS)
    return EventStore(redis, registry, keyspace=keyspace, **options)


async def transfers(bench: Bench, store: EventStore, concurrency: int, ports: list[int]) -> Metrics:
    """Time Transfers between two accounts of one shard (a command's writes share a shard)."""
    ids = [account_id(n) for n in range(CLUSTER_ACCOUNTS)]

    async def seed(i: int) -> None:
        await store.append(ids[i], [Deposited(INITIAL_BALANCE)], expected=ExpectedVersion.ANY)

    await run_batch(seed, len(ids))
    by_shard: dict[int, list[str]] = {}
    for stream_id in ids:
        by_shard.setdefault(store.keyspace.shard_of(stream_id), []).append(stream_id)
    groups = list(by_shard.values())
    executor = Executor(store)
    rng = random.Random(5)

    async def op() -> None:
        group = groups[rng.randrange(len(groups))]
        a, b = rng.sample(group, 2)
        await executor.execute(Transfer(source=StreamId(a), target=StreamId(b)))

    await drive(op, concurrency, bench.warmup)
    latencies: list[float] = []
    cpu_before, client_before = await servers_cpu(ports), time.process_time()
    ops, elapsed = await drive(op, concurrency, bench.duration, latencies)
    client = time.process_time() - client_before
    metrics: Metrics = {"ops": ops, "ops_per_s": round(ops / elapsed, 1)}
    latencies.sort()
    metrics.update(ms_percentiles([x * 1000 for x in latencies], "lat"))
    metrics.update(cpu_metrics(cpu_before, await servers_cpu(ports), client, ops))
    return metrics


async def sharded_command(bench: Bench, *, concurrency: int, cluster: bool) -> Metrics:
    """Executor.execute of a Transfer within one of 8 shards, on a private Redis."""
    with private_redis(cluster) as (url, ports):
        redis = rsaga_connect(RedisSettings(url=url, cluster=cluster))
        try:
            store = sharded_store(redis, f"{bench.prefix}.cmd", bench.registry)
            return await transfers(bench, store, concurrency, ports)
        finally:
            await redis.aclose()


async def replicated_command(bench: Bench, *, concurrency: int) -> Metrics:
    """Transfers on 3 masters with a replica each: durability "replicated" against "async"."""
    with private_redis(cluster=True, replicas=1) as (url, ports):
        redis = rsaga_connect(RedisSettings(url=url, cluster=True))
        try:
            plain = sharded_store(redis, f"{bench.prefix}.async", bench.registry)
            default = await transfers(bench, plain, concurrency, ports)
            durable = sharded_store(
                redis, f"{bench.prefix}.replicated", bench.registry, durability="replicated"
            )
            metrics = await transfers(bench, durable, concurrency, ports)
        finally:
            await redis.aclose()
    metrics["async_ops_per_s"] = default["ops_per_s"]
    metrics["async_lat_p50_ms"] = default["lat_p50_ms"]
    rate, base = metrics["ops_per_s"], default["ops_per_s"]
    if isinstance(rate, float) and isinstance(base, float) and base:
        metrics["ratio_to_async"] = round(rate / base, 3)
    return metrics


async def sharded_process_e2e(bench: Bench, *, orders: int, workers: int, cluster: bool) -> Metrics:
    """Order fulfilments per second over 8 shards: 2 workers, 1 scheduler, a private Redis."""
    with private_redis(cluster) as (url, ports):
        redis = rsaga_connect(RedisSettings(url=url, cluster=cluster))
        keyspace = Keyspace(prefix=f"{bench.prefix}.e2e", shards=CLUSTER_SHARDS)
        registry = EventRegistry([OrderPlaced, *FRAMEWORK_EVENTS])
        store = EventStore(redis, registry, keyspace=keyspace)
        env = {"RSAGA_SHARDS": str(CLUSTER_SHARDS), "RSAGA_REDIS_CLUSTER": str(cluster).lower()}
        stats = [keyspace.process_stats(n, "order-fulfilment") for n in range(CLUSTER_SHARDS)]

        async def completed(n: int) -> bool:
            async with redis.pipeline(transaction=False) as pipe:
                for key in stats:
                    pipe.hmget(key, ["completed", "failed"])
                replies = await pipe.execute()
            if sum(int(failed or 0) for _, failed in replies):
                raise ScenarioFailed("order processes failed")
            return sum(int(done or 0) for done, _ in replies) >= n

        async def place(prefix: str, count: int) -> None:
            async def one(i: int) -> None:
                await store.append(f"order-{prefix}{i}", [OrderPlaced(f"{prefix}{i}", 100)])

            await run_batch(one, count)

        try:
            with Fleet(url, keyspace, env) as fleet:
                handlers = [arg for group in E2E_GROUPS for arg in ("--handler", group)]
                for _ in range(workers):
                    fleet.start("worker", *handlers)
                fleet.start("scheduler")
                startup = await fleet.ready(redis)
                await place("w", E2E_WARMUP_ORDERS)
                await fleet.wait("the warm-up orders", lambda: completed(E2E_WARMUP_ORDERS))

                def fleet_cpu() -> float:
                    return sum(c.cpu_seconds() or 0.0 for c in fleet.children)

                cpu_before, fleet_before = await servers_cpu(ports), fleet_cpu()
                started = perf_counter()
                await place("b", orders)
                total = E2E_WARMUP_ORDERS + orders
                await fleet.wait("every order completed", lambda: completed(total), poll=0.01)
                elapsed = perf_counter() - started
                metrics: Metrics = {
                    "orders": orders,
                    "startup_s": round(startup, 2),
                    "processes_per_s": round(orders / elapsed, 1),
                    **cpu_metrics(cpu_before, await servers_cpu(ports), 0.0, orders),
                    "worker_cpu_us": round((fleet_cpu() - fleet_before) / orders * 1e6, 1),
                }
                del metrics["client_cpu_us"]
                fleet.check()
                return metrics
        finally:
            await redis.aclose()


scenario("sharded_command_c32", concurrency=32, cluster=False)(sharded_command)
scenario(
    "cluster_command_c32", ratios={"ratio_to_node": "sharded_command_c32"},
    concurrency=32, cluster=True,
)(sharded_command)
scenario("replicated_command_c32", concurrency=32)(replicated_command)
scenario(
    "sharded_process_e2e", rate="processes_per_s",
    orders=CLUSTER_E2E_ORDERS, workers=E2E_WORKERS, cluster=False,
)(sharded_process_e2e)
scenario(
    "cluster_process_e2e", rate="processes_per_s", ratios={"ratio_to_node": "sharded_process_e2e"},
    orders=CLUSTER_E2E_ORDERS, workers=E2E_WORKERS, cluster=True,
)(sharded_process_e2e)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def select(patterns: Sequence[str]) -> list[Scenario]:
    """Scenarios named exactly or by prefix, plus their baselines, in registry order."""
    if not patterns:
        return list(SCENARIOS.values())
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern in SCENARIOS:
            chosen.add(pattern)
            continue
        matches = [name for name in SCENARIOS if name.startswith(pattern)]
        if not matches:
            raise SystemExit(
                f"unknown scenario {pattern!r}; known: {', '.join(SCENARIOS)} (or a prefix)"
            )
        chosen.update(matches)
    pending = list(chosen)
    while pending:
        for baseline in SCENARIOS[pending.pop()].ratios.values():
            if baseline not in chosen:
                chosen.add(baseline)
                pending.append(baseline)
    return [s for name, s in SCENARIOS.items() if name in chosen]


def add_ratios(results: dict[str, Metrics]) -> None:
    for name, metrics in results.items():
        if "error" in metrics:
            continue
        for metric, baseline in SCENARIOS[name].ratios.items():
            ours = metrics.get(SCENARIOS[name].rate)
            theirs = results.get(baseline, {}).get(SCENARIOS[baseline].rate)
            if isinstance(ours, int | float) and isinstance(theirs, int | float) and theirs:
                metrics[metric] = round(ours / theirs, 3)
            else:
                metrics[metric] = None


@contextmanager
def redis_url() -> Iterator[tuple[str, bool]]:
    """(url, private): RSAGA_REDIS_URL, or a private redis-server for the run."""
    url = os.environ.get("RSAGA_REDIS_URL")
    if url:
        yield url, False
        return
    if not RedisServer.available():
        raise SystemExit("no Redis: set RSAGA_REDIS_URL or put redis-server on PATH")
    with RedisServer() as server:
        yield server.url, True


async def cleanup(redis: Redis, prefix: str, private: bool) -> None:
    """Remove this run's keys: FLUSHALL on a private server, else SCAN + UNLINK."""
    if private:
        await redis.flushall()
        return
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


async def run_one(s: Scenario, bench: Bench) -> Metrics:
    """Run one scenario within its timeout; a failure becomes ``{"error": ...}``."""
    try:
        with anyio.fail_after(s.timeout):
            return await s.fn(bench)
    except TimeoutError:
        message = f"timed out after {s.timeout:g}s"
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    progress(f"  FAILED: {message}")
    return {"error": message}


async def run(
    scenarios: Sequence[Scenario], url: str, private: bool, args: argparse.Namespace
) -> dict[str, Metrics]:
    redis = connect(
        url,
        max_connections=max(CONCURRENCIES) + SETUP_CONCURRENCY + 4,
        plain_pool=args.plain_pool,
    )
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    duration, warmup = args.duration, args.warmup
    bench = Bench(redis, prefix, duration, warmup, url=url)
    results: dict[str, Metrics] = {}
    try:
        server = await redis.info("server")
        progress(
            f"redis {server['redis_version']} at {redact_url(url)}"
            f" ({'private' if private else 'shared, prefix ' + prefix}),"
            f" python {sys.version.split()[0]}, {os.cpu_count()} cpus,"
            f" {duration:g}s timed after {warmup:g}s warm-up"
        )
        for s in scenarios:
            progress(f"running {s.name} ...")
            results[s.name] = metrics = await run_one(s, bench)
            rate = metrics.get(s.rate)
            if isinstance(rate, int | float):
                progress(f"  {rate:,.0f} {s.rate.replace('_per_s', '')}/s")
    finally:
        with anyio.CancelScope(shield=True):
            await cleanup(redis, prefix, private)
            await redis.aclose()
    add_ratios(results)
    return results


def format_value(value: Metric) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3f}"


def table(results: dict[str, Metrics]) -> str:
    """One table per set of metric names, scenarios as rows."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, metrics in results.items():
        groups.setdefault(tuple(metrics), []).append(name)
    out: list[str] = []
    for columns, names in groups.items():
        rows = [["scenario", *columns]]
        rows += [[name, *(format_value(results[name][c]) for c in columns)] for name in names]
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns) + 1)]
        text = [any(isinstance(results[name][c], str) for name in names) for c in columns]
        for n, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])]
            cells += [
                cell.ljust(width) if left else cell.rjust(width)
                for cell, width, left in zip(row[1:], widths[1:], text, strict=True)
            ]
            out.append("  ".join(cells).rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="rsaga benchmarks against a real Redis (see the module docstring)."
    )
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="name or prefix")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--duration", type=float, default=3.0, help="timed seconds (3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds (0.5)")
    parser.add_argument(
        "--plain-pool",
        action="store_true",
        help="a default redis-py ConnectionPool instead of rsaga.connection.connect's",
    )
    parser.add_argument("--list", action="store_true", help="list scenarios and exit")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so worker subprocesses and redis-server are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.list:
        width = max(len(name) for name in SCENARIOS)
        for s in SCENARIOS.values():
            print(f"{s.name:{width}}  {s.doc}")
        return
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be > 0 and --warmup >= 0")
    scenarios = select(args.scenarios)
    with redis_url() as (url, private):
        results = anyio.run(run, scenarios, url, private, args)
    if args.json:
        print(json.dumps(results))
    else:
        print(table(results), end="")
    if any("error" in metrics for metrics in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
