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
  commits one event to each.
- ``command_len50_c32``: the same with account streams seeded to 50 events,
  so a command reads and folds ~100 events: the cost of folding history.

Each scenario that uses accounts seeds a set of its own (one deposit each,
outside the timed part), so streams stay short (``events_read_per_op`` shows
how short) whatever ran before.

Metrics: ``ops_per_s``; ``p50_ms`` and ``p99_ms`` per-operation latency;
``round_trips_per_op`` counted at the client (each command sent and each
pipeline executed is one round trip); ``server_cmds_per_op`` from
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

To add a scenario, write ``async def my_scenario(bench: Bench, ...) -> Metrics``
and register it with ``@scenario("name", **params)`` (stack one per parameter
set) or `register_concurrencies`; use `Bench.measure` for the warm-up and timed
loop, `Bench.store` for a store with keys of its own, `Bench.accounts` for
seeded account streams, `run_batch` for untimed setup.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import anyio
import msgspec
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline

from rsaga import (
    Command,
    DomainError,
    EventRegistry,
    EventStore,
    Executor,
    ExpectedVersion,
    Keyspace,
    RecordedEvent,
    StreamId,
    Writes,
)
from rsaga.config import RedisSettings, redact_url
from rsaga.connection import connect as rsaga_connect
from rsaga.scripts import Script, script
from rsaga.testing import RedisServer

Metric = float | int | None
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


# --- the domain the benchmarks run ----------------------------------------------------


class Deposited(msgspec.Struct, frozen=True):
    amount: int


class Withdrawn(msgspec.Struct, frozen=True):
    amount: int


Balances = dict[str, int]


class Transfer(Command[Balances], frozen=True, kw_only=True):
    """Move `amount` from one account stream to another."""

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
    envelopes: list[bytes] = []
    for stream_id, expected, events in writes:
        header += [stream_id, expected, len(events)]
        envelopes += events
    return keys, header + envelopes


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
        ops, elapsed = await drive(op, concurrency, self.duration, latencies)
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
            progress(
                f"  seeded {count:,} accounts of {history} events"
                f" in {perf_counter() - started:.1f}s"
            )
            self._accounts[name] = Accounts(store, ids)
        return self._accounts[name]


# --- the scenario registry ------------------------------------------------------------

ScenarioFn = Callable[[Bench], Awaitable[Metrics]]


@dataclass(frozen=True)
class Scenario:
    name: str
    fn: ScenarioFn
    doc: str
    ratios: dict[str, str]
    """Metric name -> baseline scenario: metric = ops_per_s / baseline's ops_per_s."""


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str, *, ratios: dict[str, str] | None = None, doc: str | None = None, **params: Any
) -> Callable[[Callable[..., Awaitable[Metrics]]], Callable[..., Awaitable[Metrics]]]:
    """Register the decorated function as scenario `name`, called with `params`.

    `doc` (default: the first line of the function's docstring) is what --list shows.

    Stack several decorators to register one function with several parameter sets.
    """

    def register(fn: Callable[..., Awaitable[Metrics]]) -> Callable[..., Awaitable[Metrics]]:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is registered twice")
        summary = doc or (fn.__doc__ or "").strip().partition("\n")[0]
        SCENARIOS[name] = Scenario(name, functools.partial(fn, **params), summary, ratios or {})
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


async def command(bench: Bench, *, concurrency: int, history: int = 1) -> Metrics:
    """Executor.execute of a Transfer between 2 of 10,000 accounts: read 2, fold, write 2."""
    accounts = await bench.accounts(f"command{concurrency}h{history}", history=history)
    executor = Executor(accounts.store)
    await script("commit").load(bench.redis)
    rng = random.Random(4)
    ids = accounts.ids
    counts = [0, 0, 0]  # operations, attempts, events read by the last attempt

    async def op() -> None:
        a, b = random_pair(rng, len(ids))
        result = await executor.execute(Transfer(source=StreamId(ids[a]), target=StreamId(ids[b])))
        counts[0] += 1
        counts[1] += result.attempts
        counts[2] += sum(result.versions.values()) - len(result.events)

    def reset() -> None:
        counts[:] = [0, 0, 0]

    metrics = await bench.measure(op, concurrency, before_timed=reset)
    ops, attempts, events_read = counts
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
scenario("event_bytes", events=EVENT_BYTES_EVENTS)(event_bytes)


# --- running --------------------------------------------------------------------------


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
        for metric, baseline in SCENARIOS[name].ratios.items():
            ours, theirs = metrics.get("ops_per_s"), results.get(baseline, {}).get("ops_per_s")
            metrics[metric] = round(ours / theirs, 3) if ours and theirs else None


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
    bench = Bench(redis, prefix, duration, warmup)
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
            results[s.name] = metrics = await s.fn(bench)
            if "ops_per_s" in metrics:
                progress(f"  {metrics['ops_per_s']:,.0f} ops/s")
    finally:
        with anyio.CancelScope(shield=True):
            await cleanup(redis, prefix, private)
            await redis.aclose()
    add_ratios(results)
    return results


def format_value(value: Metric) -> str:
    if value is None:
        return "-"
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
        for n, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
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
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:20} {s.doc}")
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


if __name__ == "__main__":
    main()
