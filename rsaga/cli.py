"""The ``rsaga`` command line.

argparse, not click or typer: subcommands with descriptions, option help with
defaults and an epilog cover everything here without a new dependency, and the
parser stays one plain function that tests can inspect.

Every failure is one line on stderr and an exit code (never a traceback):
0 success, 1 failure at run time (Redis unreachable or refusing a command,
nothing found, a failed check), 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

import rsaga
from rsaga import logs
from rsaga.app import open_store
from rsaga.cluster import (
    Master,
    cluster_layout,
    ensure_shard_count,
    is_cluster,
    one_shard_warning,
    parse_shards,
)
from rsaga.config import Settings, load_settings, redact_url
from rsaga.connection import connect, embedded, ping
from rsaga.deadletters import DeadLetters
from rsaga.errors import ConfigError, RedisUnavailable, RsagaError
from rsaga.executor import Executor
from rsaga.handlers import (
    ENTRY_POINT_GROUP,
    InstalledHandler,
    discover_handlers,
    installed_process_managers,
)
from rsaga.health import health_report, live_heartbeats, process_thresholds, report_lines
from rsaga.inspect import (
    SEARCH_STATES,
    EventRow,
    list_timeouts,
    read_events,
    search_processes,
    show_process,
)
from rsaga.interceptors import resolve as resolve_interceptors
from rsaga.keyspace import Keyspace
from rsaga.metrics import PrometheusObserver, refresh_loop, serve_metrics
from rsaga.observe import NO_OBSERVER
from rsaga.operator import Operator
from rsaga.permissions import minimal_acl, missing_permissions
from rsaga.process.api import ProcessManager
from rsaga.process.retention import Retention
from rsaga.process.runner import ProcessRunner
from rsaga.runtime.scheduler import Scheduler
from rsaga.runtime.worker import Worker
from rsaga.scripts import all_scripts
from rsaga.store import EventStore

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]

HOW_TO_REGISTER = (
    "register one with an entry point in your package's pyproject.toml "
    f'([project.entry-points."{ENTRY_POINT_GROUP}"] my-handler = "mypackage.module:Class"), '
    "or name it by import path with RSAGA_HANDLERS=module:Class (config worker.handlers; "
    "the current directory is importable)"
)


class UsageError(RsagaError):
    """A command was given arguments it cannot use (exit 2)."""


def _print(*lines: str) -> None:
    """Print `lines` for a person, control characters escaped (they may come from Redis)."""
    for line in lines:
        print(logs.printable(line), flush=True)


def _error(message: str) -> None:
    print(f"rsaga: {logs.printable(message)}", file=sys.stderr, flush=True)


async def _check(args: argparse.Namespace, settings: Settings) -> int:
    """Connect, check the user's permissions, load every script, print the deployment."""
    redis = connect(settings.redis)
    where = redact_url(settings.redis.url)
    keyspace = Keyspace(prefix=settings.store.prefix, shards=settings.store.shards)
    masters: list[Master] = []
    try:
        info = await ping(redis, where)
        missing = await missing_permissions(redis, keyspace)
        for script in [] if missing else all_scripts():
            await script.load(redis)
        if not missing:
            await ensure_shard_count(redis, keyspace)
            if is_cluster(redis):
                masters = await cluster_layout(redis, keyspace)
    finally:
        await redis.aclose()
    if missing:
        _print(*(f"missing    {line}" for line in missing))
        _print(f"grant      ACL SETUSER <user> {minimal_acl(settings.store.prefix)}")
        return 1
    _print(
        f"redis      {where}",
        f"server     Redis {info.version} ({info.mode})",
        f"prefix     {settings.store.prefix}",
        f"shards     {settings.store.shards}",
        f"durability {settings.store.durability}",
    )
    for master in masters:
        held = _ranges(master.shards) or "none"
        _print(
            f"master     {master.name}: {master.slots} slots, {master.replicas} replica(s), "
            f"shards {held}"
        )
    warning = one_shard_warning(redis, keyspace)
    if warning:
        _print(f"warning    {warning}")
    _print(f"scripts    {len(all_scripts())} loaded", "ok")
    return 0


def _ranges(numbers: list[int]) -> str:
    """``0-3,6`` for [0, 1, 2, 3, 6]."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


async def _agree_on_shards(store: EventStore) -> None:
    """Refuse to run on a keyspace made with another shard count; warn of one shard on a
    cluster."""
    await ensure_shard_count(store.redis, store.keyspace)
    warning = one_shard_warning(store.redis, store.keyspace)
    if warning:
        logging.getLogger("rsaga").warning(warning)


def _shard_choice(args: argparse.Namespace, settings: Settings) -> list[int] | None:
    if not args.shards:
        return None
    try:
        return parse_shards(args.shards, settings.store.shards)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class _Progress:
    """Demo progress: one line redrawn in place on a terminal; elsewhere plain lines, when
    something changed (at most one a second) and every `QUIET_EVERY` seconds regardless."""

    QUIET_EVERY = 10.0

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.in_place = bool(stream.isatty())
        self.drawn = False
        self.latest = ""
        self.shown = ""
        self.shown_at = float("-inf")

    def update(self, line: str) -> None:
        """Show the current status `line` (it starts with the elapsed time)."""
        self.latest = logs.printable(line)
        if self.in_place:
            self.stream.write(f"\r\x1b[K{self.latest}")
            self.stream.flush()
            self.drawn = True
            return
        since = time.monotonic() - self.shown_at
        changed = self.latest.split()[1:] != self.shown.split()[1:]  # past the clock
        if since >= self.QUIET_EVERY or (changed and since >= 1.0):
            self._plain(self.latest)

    def notice(self, line: str) -> None:
        """Show a line that stays (a warning), above the status line."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False
        self._plain(logs.printable(line))

    def finish(self) -> None:
        """End the status line; in plain mode make sure the last status was shown."""
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False
        elif self.latest.split()[1:] != self.shown.split()[1:]:
            self._plain(self.latest)
        self.stream.flush()

    def _plain(self, line: str) -> None:
        self.stream.write(f"{line}\n")
        self.stream.flush()
        self.shown, self.shown_at = line, time.monotonic()


def _examples_demo() -> Any:
    """The example application's demo module; a `UsageError` saying how to install it."""
    try:
        return importlib.import_module("rsaga_examples.demo")
    except ModuleNotFoundError as exc:
        if exc.name not in ("rsaga_examples", "rsaga_examples.demo"):
            raise
        raise UsageError(
            "the demo runs rsaga's example application (rsaga-examples), which is not "
            "installed: from a clone of rsaga, pip install -e ./handlers"
        ) from None


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    """Run order fulfilment processes and travel sagas end to end, then summarise."""
    demo = _examples_demo()
    if "RSAGA_LOG_LEVEL" not in os.environ:
        logging.getLogger("rsaga").setLevel(logging.WARNING)  # the table tells the story
    if args.clean and args.drive_only:
        raise UsageError(
            "--clean removes the demo's own keyspace; a --drive-only run wrote into the "
            "deployment's prefix, which the demo does not delete"
        )
    if settings.redis.url:
        redis = connect(settings.redis)
        target = redact_url(settings.redis.url)
        await ping(redis, target)
    else:
        if args.drive_only or args.clean:
            raise ConfigError(
                f"--{'drive-only' if args.drive_only else 'clean'} needs a real Redis: "
                "set RSAGA_REDIS_URL"
            )
        redis = embedded()
        target = "embedded fakeredis (set RSAGA_REDIS_URL to use a real server)"
    # In-process runs get a keyspace of their own, so they never mix with a deployment.
    prefix = settings.store.prefix if args.drive_only else f"{settings.store.prefix}-demo"
    try:
        if args.clean:
            removed = await demo.clean(redis, prefix)
            _print(f"removed {removed} keys under prefix {prefix!r} on {target}")
            return 0
        definitions = None
        if args.drive_only:
            definitions = [item.handler for item in discover_handlers(settings.worker.handlers)]
        where = (
            f"workers elsewhere, prefix {prefix!r}" if args.drive_only
            else "a worker and a scheduler in this process"
        )
        _print(
            f"rsaga demo: {args.orders} orders and {args.trips} trips "
            f"({args.failure_rate:.0%} set to fail, {args.timeout_rate:.0%} to time out)",
            f"on {target}, with {where}",
            "",
        )
        progress = _Progress(sys.stdout)
        try:
            report = await demo.run_demo(
                redis,
                orders=args.orders,
                trips=args.trips,
                failure_rate=args.failure_rate,
                timeout_rate=args.timeout_rate,
                seed=args.seed,
                prefix=prefix,
                drive_only=args.drive_only,
                definitions=definitions,
                progress=progress.update,
                notice=progress.notice,
            )
        finally:
            progress.finish()
    finally:
        await redis.aclose()
    _print("", *report.lines())
    if settings.redis.url and not args.drive_only:
        _print(
            f"written under prefix {prefix!r}: see it with `RSAGA_PREFIX={prefix} rsaga "
            "process list --state completed`; remove it with `rsaga demo --clean`"
        )
    ok: bool = report.ok
    return 0 if ok else 1


def _store(settings: Settings) -> EventStore:
    """The configured store, knowing rsaga's own events only (no handler is imported)."""
    return open_store(settings, installed=False)


def _selected_handlers(settings: Settings, names: Sequence[str]) -> list[InstalledHandler]:
    installed = discover_handlers(settings.worker.handlers)
    if not names:
        return installed
    by_name = {h.handler.name: h for h in installed}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(
            f"--handler: no handler named {', '.join(unknown)}; installed: "
            + (", ".join(sorted(by_name)) or "none")
        )
    return [by_name[n] for n in names]


async def _handlers(args: argparse.Namespace, settings: Settings) -> int:
    """List installed handlers and where each comes from."""
    installed = discover_handlers(settings.worker.handlers)
    if not installed:
        _print(f"no handlers installed: {HOW_TO_REGISTER}")
        return 0
    width = max(len(h.handler.name) for h in installed)
    for item in installed:
        events = ", ".join(t.__name__ for t in item.handler.events)
        kind = "process" if issubclass(item.handler, ProcessManager) else "handler"
        _print(
            f"{item.handler.name:<{width}}  {kind:<8} {item.source}",
            f"{'':<{width}}  {'':<8} events: {events}",
        )
    return 0


async def _watch_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if stop.is_set():
                logging.getLogger("rsaga").warning("second signal: exiting now")
                os._exit(1)
            logging.getLogger("rsaga").info(
                "%s: stopping gracefully (send again to exit at once)", signal.Signals(signum).name
            )
            stop.set()


async def _worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run handlers until SIGTERM or SIGINT."""
    selected = _selected_handlers(settings, args.handler or [])
    if not selected:
        raise UsageError(f"no handler to run: {HOW_TO_REGISTER}")
    worker_settings = settings.worker
    if args.concurrency:
        worker_settings = msgspec.structs.replace(worker_settings, concurrency=args.concurrency)
    shards = _shard_choice(args, settings)
    store = _store(settings)
    await ping(
        store.redis, redact_url(settings.redis.url), wait=settings.redis.connect_timeout,
        keyspace=store.keyspace,
    )
    await _agree_on_shards(store)
    interceptors = resolve_interceptors(worker_settings.interceptors)
    observer = next((i for i in interceptors if isinstance(i, PrometheusObserver)), None)
    if observer is None and args.metrics_port:
        observer = PrometheusObserver()
    worker = Worker(
        Executor(
            store, retry=settings.executor.retry, observer=observer or NO_OBSERVER,
            state_cache_size=settings.executor.state_cache_size,
            interceptors=interceptors,
        ),
        [item.handler() for item in selected],
        settings=worker_settings,
        shards=shards,
        retention=settings.processes.retention,
    )
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, stop)
            if observer is not None and args.metrics_port:
                types = worker.runner.managers if worker.runner else {}
                groups = [(sub.consumer.log, sub.consumer.group) for sub in worker.subscriptions]
                tg.start_soon(
                    serve_metrics, observer.registry, args.metrics_port, stop,
                    settings.metrics.host,
                )
                tg.start_soon(
                    functools.partial(
                        refresh_loop, observer, store.redis, store.keyspace, stop,
                        process_types=list(types), groups=groups,
                        thresholds=process_thresholds(settings.health, types.values()),
                    )
                )
            await worker.run(stop)
            tg.cancel_scope.cancel()
    finally:
        await store.redis.aclose()
    return 0


async def _scheduler(args: argparse.Namespace, settings: Settings) -> int:
    """Move due timeouts to the due streams until SIGTERM or SIGINT."""
    shards = _shard_choice(args, settings)
    store = _store(settings)
    await ping(
        store.redis, redact_url(settings.redis.url), wait=settings.redis.connect_timeout,
        keyspace=store.keyspace,
    )
    await _agree_on_shards(store)
    observer = PrometheusObserver() if args.metrics_port else None
    scheduler = Scheduler(
        store.redis,
        store.keyspace,
        shards=shards,
        batch_size=args.batch_size or settings.scheduler.batch_size,
        max_sleep=settings.scheduler.max_sleep,
        heartbeat_ttl=settings.scheduler.heartbeat_ttl,
        retention_interval=settings.scheduler.retention_interval,
        retention_batch=settings.scheduler.retention_batch,
        observer=observer or NO_OBSERVER,
    )
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, stop)
            if observer is not None:
                tg.start_soon(
                    serve_metrics, observer.registry, args.metrics_port, stop,
                    settings.metrics.host,
                )
                tg.start_soon(
                    functools.partial(
                        refresh_loop, observer, store.redis, store.keyspace, stop, scheduler=True
                    )
                )
            await scheduler.run(stop)
            tg.cancel_scope.cancel()
    finally:
        await store.redis.aclose()
    return 0


def _process_types(settings: Settings) -> list[type[ProcessManager[Any]]]:
    """The installed process managers and sagas: their health thresholds apply."""
    return [
        item.handler for item in discover_handlers(settings.worker.handlers)
        if issubclass(item.handler, ProcessManager)
    ]


def _json(value: Any) -> str:
    return msgspec.json.encode(value, enc_hook=str).decode()


async def _local_health(settings: Settings) -> int:
    """Exit 0 if a worker or scheduler of this host has a live heartbeat, else 1 (never 2:
    Docker reserves it), for a container's healthcheck: the host is the container."""
    host = socket.gethostname()
    store = _store(settings)
    try:
        beats = await live_heartbeats(store.redis, store.keyspace)
    except Exception as exc:
        _error(_explain(exc, redact_url(settings.redis.url))[1])
        return 1
    finally:
        await store.redis.aclose()
    mine = [beat for beat in beats if beat.host == host]
    if not mine:
        _print(f"unhealthy: no live heartbeat of a worker or scheduler on host {host}")
        return 1
    _print(*(f"ok: {beat.kind} {beat.consumer} (pid {beat.pid}) is alive" for beat in mine))
    return 0


async def _health(args: argparse.Namespace, settings: Settings) -> int:
    """Health from Redis; exit 0 ok, 1 warning, 2 critical."""
    if args.local:
        return await _local_health(settings)
    store = _store(settings)
    try:
        await ping(store.redis, redact_url(settings.redis.url), keyspace=store.keyspace)
        thresholds = process_thresholds(settings.health, _process_types(settings))
        report = await health_report(store.redis, store.keyspace, settings.health, thresholds)
    finally:
        await store.redis.aclose()
    if args.json:
        _print(_json(report))
    else:
        _print(*report_lines(report))
    return report.exit_code


async def _process(args: argparse.Namespace, settings: Settings) -> int:
    """List processes, or show one."""
    store = open_store(settings)
    try:
        if args.action == "show":
            view = await show_process(store, args.id)
            if view is None:
                _error(f"no process with stream {args.id!r}")
                return 1
            if args.json:
                _print(_json(view))
                return 0
            _print(f"process {view.stream_id}: {view.status}")
            for t in view.pending_timeouts:
                _print(f"  waiting for timeout {t.name} (attempt {t.attempt}) due {t.due_at:%c}")
            for e in view.events:
                at = f"{e.occurred_at:%Y-%m-%d %H:%M:%S.%f}"[:-3] if e.occurred_at else "?"
                _print(f"  {e.version:>4}  {at}  {e.type:<32} {e.data}")
            return 0
        thresholds = process_thresholds(settings.health, _process_types(settings))
        if args.state == "old" and not settings.health.max_process_age and not any(
            t.max_process_age for t in thresholds.values()
        ):
            print("rsaga: no process is old: set health.max_process_age (or a process "
                  "type's max_process_age)", file=sys.stderr)
            return 2
        page = await search_processes(
            store.redis, store.keyspace,
            types=[args.type] if args.type else None,
            state=None if args.state == "any" else args.state,
            correlation_id=args.correlation, id_prefix=args.id_prefix,
            started_after=args.started_after, started_before=args.started_before,
            finished_after=args.finished_after, finished_before=args.finished_before,
            limit=args.limit, cursor=args.cursor, settings=settings.health,
            thresholds=thresholds,
        )
        if args.json:
            _print(_json(page))
            return 0
        if not page.items:
            _print(f"no {'' if args.state == 'any' else args.state + ' '}processes found")
        for row in page.items:
            started = f"{row.started_at:%Y-%m-%d %H:%M:%S}" if row.started_at else "?"
            ended = f"{row.finished_at:%Y-%m-%d %H:%M:%S}" if row.finished_at else "-"
            retried = f"  {row.retry_step} retried {row.retries}x" if row.retries else ""
            _print(f"{row.stream_id:<48} {row.state:<11} {started}  {ended}  "
                   f"{row.correlation_id or ''}{retried}")
        if page.cursor:
            _print(f"more: --cursor {page.cursor}")
        return 0
    finally:
        await store.redis.aclose()


async def _operate(args: argparse.Namespace, settings: Settings) -> int:
    """Act on one process as an operator: state, terminate, signal, retry."""
    store = open_store(settings)
    try:
        runner = ProcessRunner(
            Executor(store), installed_process_managers(settings.worker.handlers),
            retention=settings.processes.retention,
        )
        operator = Operator(runner)
        if args.action == "state":
            state = await operator.state(args.id)
            if args.json:
                _print(_json(state))
                return 0
            info = state.info
            _print(f"process {info.stream_id} ({info.process_type}): {info.status}")
            for name, due in sorted(info.due.items(), key=lambda item: item[1]):
                _print(f"  waiting for timeout {name} due {_time_of(due)}")
            for step, count in info.retries.items():
                _print(f"  step {step} retried {count} times")
            _print(f"  state: {_json(state.state)}")
            return 0
        if args.action == "terminate":
            state = await operator.terminate(args.id, args.reason, compensate=args.compensate)
            _print(f"terminated {args.id} as {operator.by}: now {state.info.status}")
        elif args.action == "signal":
            try:
                data = msgspec.json.decode(args.data)
            except msgspec.DecodeError as exc:
                raise UsageError(f"--data is not JSON: {exc}") from None
            state = await operator.signal(args.id, data, key=args.key)
            _print(f"signalled {args.id}: now {state.info.status}")
        else:
            _print(await operator.retry(args.id, timer=args.timeout))
        return 0
    finally:
        await store.redis.aclose()


def _time_of(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def _timeouts(args: argparse.Namespace, settings: Settings) -> int:
    """List the next timeouts due."""
    store = _store(settings)
    try:
        rows = await list_timeouts(store.redis, store.keyspace, limit=args.limit)
    finally:
        await store.redis.aclose()
    if args.json:
        _print(_json(rows))
    elif not rows:
        _print("no timeouts scheduled")
    for r in [] if args.json else rows:
        late = f"  OVERDUE {r.overdue_ms} ms" if r.overdue_ms else ""
        _print(f"{r.due_at:%Y-%m-%d %H:%M:%S}  {r.process:<40} {r.name} #{r.attempt}{late}")
    return 0


async def _stream(args: argparse.Namespace, settings: Settings) -> int:
    """Show the events of one stream."""
    store = open_store(settings)
    try:
        rows = await read_events(store, args.id, from_version=args.from_version, limit=args.limit)
    finally:
        await store.redis.aclose()
    if args.json:
        _print(_json(rows))
        return 0
    if not rows:
        _error(f"stream {args.id!r} has no events from version {args.from_version}")
        return 1
    for e in rows:
        at = f"{e.occurred_at:%Y-%m-%d %H:%M:%S.%f}"[:-3] if e.occurred_at else "?"
        _print(f"{e.version:>5}  {at}  {e.type:<32} {e.data}  corr={e.correlation_id}")
    return 0


async def _archive(args: argparse.Namespace, settings: Settings) -> int:
    """Write the finished processes due for removal as JSON lines, events included."""
    to_file = args.output != "-"
    try:
        # Opened before Redis is asked: a bad path is the user's to fix, not an outage.
        out = await anyio.open_file(args.output, "a", encoding="utf-8") if to_file \
            else anyio.wrap_file(sys.stdout)
    except OSError as exc:
        raise UsageError(f"--output {args.output}: {exc.strerror or exc}") from None
    try:
        store = open_store(settings)
        try:
            due = await Retention(store.redis, store.keyspace).expiring(
                within=args.within, limit=args.limit
            )
            for item in due:
                events: list[EventRow] = []
                while True:
                    page = await read_events(
                        store, item.stream_id, from_version=len(events) + 1, limit=1000
                    )
                    events += page
                    if len(page) < 1000:
                        break
                line = {"stream_id": item.stream_id, "process_type": item.process_type,
                        "expires_at_ms": item.expires_ms, "events": events}
                await out.write(_json(line) + "\n")
            await out.flush()
        finally:
            await store.redis.aclose()
    finally:
        if to_file:
            await out.aclose()
    if to_file:
        _print(f"archived {len(due)} process(es) to {args.output}")
    return 0


async def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    """List, replay or drop dead letters."""
    store = _store(settings)
    letters = DeadLetters(store.redis, store.keyspace)
    try:
        if args.action == "list":
            found = await letters.list(shard=args.shard, limit=args.limit)
            if args.json:
                _print(_json(found))
            elif not found:
                _print("no dead letters")
            for letter in [] if args.json else found:
                version = "" if letter.version is None else f"@{letter.version}"
                _print(
                    f"{letter.shard}/{letter.id}  {letter.handler}  {letter.stream_id}{version}  "
                    f"{letter.error_type}: {letter.error.splitlines()[0] if letter.error else ''}"
                    f"  (attempts {letter.attempts}, {letter.failed_at:%Y-%m-%d %H:%M:%S})"
                )
            return 0
        if args.all:
            if args.action == "replay":
                report = await letters.replay_all(shard=args.shard)
                _print(f"replayed {len(report.replayed)}")
                for letter_id, why in report.failed.items():
                    _print(f"could not replay {letter_id}: {why}")
                return 1 if report.failed else 0
            _print(f"dropped {await letters.drop_all(shard=args.shard)}")
            return 0
        if not args.id:
            raise UsageError(f"dlq {args.action}: give an ID (as `rsaga dlq list` prints it) "
                             "or --all")
        shard, entry_id = _dead_letter_id(args.id, args.shard, settings.store.shards)
        if args.action == "replay":
            new_log_id = await letters.replay(entry_id, shard=shard)
            _print(f"replayed as log entry {new_log_id}" if new_log_id else "no such dead letter")
            return 0 if new_log_id else 1
        dropped = await letters.drop(entry_id, shard=shard)
        _print("dropped" if dropped else "no such dead letter")
        return 0 if dropped else 1
    finally:
        await store.redis.aclose()


async def _web(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the operator console until SIGTERM or SIGINT."""
    try:
        from rsaga.web import serve
    except ImportError as exc:
        raise ConfigError(
            f"rsaga web needs the web extra: pip install 'rsaga[web]' ({exc.name} is missing)"
        ) from None
    await serve(settings, host=args.host, port=args.port)
    return 0


_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _dead_letter_id(text: str, shard_option: int | None, shards: int) -> tuple[int, str]:
    """(shard, entry id) of a dead-letter id as `rsaga dlq list` prints it, ``SHARD/ID``,
    or a bare ``ID`` on `shard_option` (default 0); `UsageError` if malformed."""
    shard_text, slash, entry_id = text.rpartition("/")
    if not _ENTRY_ID.fullmatch(entry_id) or (slash and not shard_text.isdigit()):
        raise UsageError(
            f"{text!r} is not a dead-letter id: give it as `rsaga dlq list` prints it, "
            "SHARD/ENTRY-ID such as 0/1733000000000-0"
        )
    shard = int(shard_text) if slash else (shard_option or 0)
    if slash and shard_option is not None and shard_option != shard:
        raise UsageError(f"{text!r} is on shard {shard}, but --shard says {shard_option}")
    if not 0 <= shard < shards:
        raise UsageError(f"{text!r}: shard {shard} does not exist (store.shards = {shards})")
    return shard, entry_id


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {value}")
    return value


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an ISO 8601 time such as 2026-12-01T09:30, got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shows = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shows and "default" not in text:
            text += " (default: %(default)s)"
        return text


EPILOG = """\
exit codes:
  0    success (health: ok)
  1    failure at run time: Redis unreachable or refusing a command, nothing found,
       a failed check (health: warning)
  2    invalid configuration or usage: a bad setting or argument, credentials refused,
       no handler to run (health: critical)
  130  interrupted

main environment variables (they override the config file; the README lists all):
  RSAGA_CONFIG       config file (default: config/rsaga.toml)
  RSAGA_REDIS_URL    redis://[user:password@]host:port/db, rediss:// for TLS
                     (empty: `rsaga demo` runs on an embedded fakeredis)
  RSAGA_PREFIX       prefix of every key (default: rsaga)
  RSAGA_SHARDS       number of shards (default: 1)
  RSAGA_HANDLERS     handlers by import path, module:Class,... (besides entry points;
                     the current directory is importable)
  RSAGA_CONCURRENCY  events one worker handles at once (default: 32)
  RSAGA_LOG_FORMAT   kv or json (default: kv); RSAGA_LOG_LEVEL (default: INFO)
"""


class _TopHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """Keeps the epilog's layout (exit codes, environment variables)."""


def _command(
    commands: Any, name: str, summary: str, description: str, run: Handler | None = None
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=description, formatter_class=_HelpFormatter
    )
    if run is not None:
        parser.set_defaults(run=run)
    return parser


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _limit_option(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    parser.add_argument("--limit", type=_positive, default=default, metavar="N", help=what)


def _shards_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--shards", metavar="LIST",
        help=f"{what}, e.g. 0-7 or 0,2,4-5 (default: every shard)",
    )


def _metrics_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port", type=_positive, metavar="PORT",
        help="serve Prometheus metrics on this port (default: no metrics server)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rsaga`` command: ``rsaga COMMAND`` for what runs,
    ``rsaga NOUN VERB`` for what inspects and repairs."""
    parser = argparse.ArgumentParser(
        prog="rsaga",
        description="Long-running business processes (process managers and sagas) on Redis "
        "Streams, event sourced.",
        epilog=EPILOG,
        formatter_class=_TopHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rsaga {rsaga.__version__}")
    parser.add_argument(
        "--config", metavar="PATH",
        help="config file (default: $RSAGA_CONFIG, else config/rsaga.toml if it exists)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    _command(
        commands, "check", "connect to Redis, load the scripts, print the setup",
        "Connect to the configured Redis, load every Lua script and print the server, "
        "prefix and shards. Exit 0 if all of it works.", _check,
    )

    demo = _command(
        commands, "demo", "run order processes and travel sagas end to end",
        "Place orders and request trips (some set to fail or to time out), run them to "
        "their end and print a table; exit 0 only if every process ended as its inputs "
        "call for. Needs the example application (pip install -e ./handlers). Without "
        "RSAGA_REDIS_URL it runs on an embedded fakeredis; with it, under the prefix "
        "<prefix>-demo (or the configured prefix with --drive-only).", _demo,
    )
    demo.add_argument("--orders", type=_count, default=100, metavar="N",
                      help="order-fulfilment processes to start")
    demo.add_argument("--trips", type=_count, default=100, metavar="N",
                      help="travel-booking sagas to start")
    demo.add_argument("--failure-rate", type=_rate, default=0.2, metavar="R",
                      help="share of processes set to fail, 0..1")
    demo.add_argument("--timeout-rate", type=_rate, default=0.1, metavar="R",
                      help="share of processes whose service never answers, 0..1")
    demo.add_argument("--seed", type=int, default=None, metavar="N",
                      help="random seed of the plan (default: a new plan each run)")
    demo.add_argument(
        "--drive-only", action="store_true",
        help="only start the processes and watch them: workers and a scheduler run "
        "elsewhere (the Procfile), under the configured prefix",
    )
    demo.add_argument(
        "--clean", action="store_true",
        help="delete what earlier demo runs wrote on the configured Redis (the keys under "
        "<prefix>-demo) and exit",
    )

    handlers = _command(
        commands, "handlers", "installed handlers and process types (list)",
        "List the handlers and process types `rsaga worker` would run: those registered "
        f"as entry points ({ENTRY_POINT_GROUP}) and those named in worker.handlers.",
        _handlers,
    )
    handlers_verbs = handlers.add_subparsers(dest="action", metavar="VERB")
    _command(handlers_verbs, "list", "each handler, its kind, source and events "
             "(the default)", "List each installed handler: name, kind, where it comes "
             "from, the events it handles.")

    worker = _command(
        commands, "worker", "run handlers and process managers until SIGTERM or SIGINT",
        "Run every installed handler and process type (or those named) over the shard "
        "logs. SIGTERM or SIGINT stops it gracefully; a second signal exits at once.",
        _worker,
    )
    worker.add_argument(
        "--handler", action="append", metavar="NAME",
        help="run only this handler (repeatable; default: every installed one)",
    )
    worker.add_argument(
        "--concurrency", type=_positive, metavar="N",
        help="events handled at once (default: worker.concurrency, 32)",
    )
    _shards_option(worker, "serve only these shards' logs")
    _metrics_option(worker)

    scheduler = _command(
        commands, "scheduler", "move due timeouts to the workers until SIGTERM or SIGINT",
        "Move timeouts to the workers when they fall due, by the Redis server's clock. "
        "Several may run; one is enough.", _scheduler,
    )
    scheduler.add_argument(
        "--batch-size", type=_positive, metavar="N",
        help="timeouts moved per atomic call (default: scheduler.batch_size, 1000)",
    )
    _shards_option(scheduler, "drain only these shards' timeouts")
    _metrics_option(scheduler)

    health = _command(
        commands, "health", "health from Redis; exit 0 ok, 1 warning, 2 critical",
        "Report live workers and schedulers, process types, consumer lag, dead letters "
        "and overdue timeouts, computed from Redis. Exit 0 ok, 1 warning, 2 critical.",
        _health,
    )
    _json_option(health)
    health.add_argument(
        "--local", action="store_true",
        help="only whether a worker or scheduler on this host has a live heartbeat: exit 0 "
        "or 1 (a container healthcheck, where the host is the container)",
    )

    process = _command(
        commands, "process",
        "find, inspect and act on processes (list, show, state, terminate, signal, retry)",
        "Inspect process managers and sagas, and act on one as an operator.",
    )
    process_verbs = process.add_subparsers(dest="action", required=True, metavar="VERB")
    listing = _command(process_verbs, "list", "search processes, newest first",
                       "Search processes, newest first (unfinished by start time, finished by "
                       "end time); every filter given must hold. Pages with --cursor.",
                       _process)
    listing.add_argument("--type", metavar="TYPE",
                         help="one process type (default: every type)")
    listing.add_argument("--state", choices=[*SEARCH_STATES, "any"], default="active",
                         help="which processes")
    listing.add_argument("--correlation", metavar="ID",
                         help="started in this correlation id (default: any)")
    listing.add_argument("--id-prefix", metavar="PREFIX",
                         help="process id starts with it (default: any)")
    for bound in ("started-after", "started-before", "finished-after", "finished-before"):
        listing.add_argument(
            f"--{bound}", type=_moment, metavar="TIME",
            help="ISO 8601, UTC unless it says (default: no bound)",
        )
    _limit_option(listing, 50, "processes per page")
    listing.add_argument("--cursor", help="the next page, as the previous page printed it")
    _json_option(listing)
    showing = _command(process_verbs, "show", "one process: history, state, timeouts",
                       "Show one process's events with times, its state and its pending "
                       "timeouts. Exit 1 if there is no such process.", _process)
    showing.add_argument("id", metavar="ID",
                         help="the process's stream id, e.g. order-fulfilment-17")
    _json_option(showing)
    state = _command(process_verbs, "state", "one process's folded state now",
                     "Show what one process's definition folds its stream to: rsaga's view "
                     "(status, pending timeouts, retries) and the process's own state. Needs "
                     "the definition installed here. Exit 1 if there is no such process.",
                     _operate)
    state.add_argument("id", metavar="ID", help="the process's stream id")
    _json_option(state)
    terminate = _command(process_verbs, "terminate", "end an active process as failed",
                         "End an active process as failed (its timeouts cancelled), recording "
                         "who and why on its stream. With --compensate a saga first undoes "
                         "its steps, the running one too, and ends compensated. Exit 1 if the "
                         "process does not exist or already ended.", _operate)
    terminate.add_argument("id", metavar="ID", help="the process's stream id")
    terminate.add_argument("--reason", required=True, help="why (recorded with your name)")
    terminate.add_argument("--compensate", action="store_true",
                           help="a saga: compensate its steps first (default: no)")
    signal_ = _command(process_verbs, "signal", "deliver data to an active process",
                       "Deliver JSON data to an active process's decide() as an "
                       "AdvanceTrigger, recorded on its stream; once per --key.", _operate)
    signal_.add_argument("id", metavar="ID", help="the process's stream id")
    signal_.add_argument("--data", required=True, metavar="JSON", help="the data, as JSON")
    signal_.add_argument("--key", help="idempotency key: a repeated key applies once "
                         "(default: a new key, so every call delivers)")
    retry = _command(process_verbs, "retry", "re-run an active process's current step now",
                     "Re-deliver the process's latest dead-lettered trigger, or fire its next "
                     "pending timeout now (the deadline aside), as if its time had come. "
                     "Exit 1 if there is nothing to retry.", _operate)
    retry.add_argument("id", metavar="ID", help="the process's stream id")
    retry.add_argument("--timeout", metavar="NAME",
                       help="fire this pending timeout (default: the next one due)")

    timeouts = _command(commands, "timeouts", "scheduled timeouts (list)",
                        "Inspect scheduled timeouts.")
    timeouts_verbs = timeouts.add_subparsers(dest="action", required=True, metavar="VERB")
    timeouts_list = _command(timeouts_verbs, "list", "the next timeouts due",
                             "List the next timeouts due, overdue ones marked.", _timeouts)
    _limit_option(timeouts_list, 50, "at most this many")
    _json_option(timeouts_list)

    stream = _command(commands, "stream", "the events of one stream (show)",
                      "Inspect event streams.")
    stream_verbs = stream.add_subparsers(dest="action", required=True, metavar="VERB")
    stream_show = _command(stream_verbs, "show", "the events of one stream",
                           "Show the events of one stream with times and correlation "
                           "ids. Exit 1 if it has none.", _stream)
    stream_show.add_argument("id", metavar="STREAM_ID", help="the stream id")
    stream_show.add_argument("--from", dest="from_version", type=_positive, default=1,
                             metavar="V", help="first version shown")
    _limit_option(stream_show, 100, "at most this many events")
    _json_option(stream_show)

    archive = _command(
        commands, "archive", "finished processes due for removal, as JSON lines",
        "Write every finished process whose retention passes within --within seconds "
        "(its type's `retention`, default processes.retention) as one JSON line: "
        "stream_id, process_type, expires_at_ms and its events. Run it before the "
        "scheduler removes them, e.g. hourly with --within 7200. It removes nothing.",
        _archive,
    )
    archive.add_argument("--within", type=_seconds, default=0.0, metavar="SECONDS",
                         help="also processes whose retention passes this soon (default 0: "
                         "those due now)")
    archive.add_argument("--output", default="-", metavar="FILE",
                         help="append to FILE instead of writing to standard output")
    _limit_option(archive, 1000, "at most this many per process type and shard")

    dlq = _command(commands, "dlq", "dead letters (list, replay, drop)",
                   "Inspect and repair dead letters: entries a handler gave up on.")
    dlq_verbs = dlq.add_subparsers(dest="action", required=True, metavar="VERB")
    dlq_list = _command(dlq_verbs, "list", "dead letters with handler, stream, error",
                        "List dead letters, oldest first: SHARD/ID, handler, "
                        "stream@version, error, attempts.", _dlq)
    dlq_list.add_argument("--shard", type=_count, default=None, metavar="N",
                          help="one shard (default: every shard)")
    _limit_option(dlq_list, 100, "at most this many per shard")
    _json_option(dlq_list)
    for verb, summary in (
        ("replay", "put dead letters back on the log, for the failed handler only"),
        ("drop", "delete dead letters"),
    ):
        repair = _command(dlq_verbs, verb, summary,
                          f"{summary[0].upper()}{summary[1:]}: one by its id, or --all. "
                          "Exit 1 if there is no such dead letter.", _dlq)
        repair.add_argument("id", nargs="?", metavar="ID",
                            help="SHARD/ID as `rsaga dlq list` prints it (a bare ID is on "
                            "--shard, default 0)")
        repair.add_argument("--all", action="store_true", help=f"{verb} every dead letter")
        repair.add_argument("--shard", type=_count, default=None, metavar="N",
                            help="the shard of a bare ID, or of --all (default: 0 for an "
                            "ID, every shard for --all)")

    web = _command(commands, "web", "the operator console (pip install 'rsaga[web]')",
                   "Serve the operator console: overview, process search and detail, "
                   "timeouts, dead letters. Read-only unless web.token (RSAGA_WEB_TOKEN) is "
                   "set. Runs until SIGTERM or SIGINT.", _web)
    web.add_argument("--host", metavar="HOST",
                     help="address to listen on (default: web.host, 127.0.0.1)")
    web.add_argument("--port", type=_positive, metavar="PORT",
                     help="port to listen on (default: web.port, 8080)")
    return parser


_SERVICES = ("worker", "scheduler", "web")
"""Long-running commands: they talk to many peers and must outlive each one."""


def _leaf(exc: BaseException) -> BaseException:
    """The error inside task-group wrappers, for the one line a person sees."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _explain(exc: BaseException, where: str) -> tuple[int, str]:
    """(exit code, one line) for an error that ends a command."""
    cause = exc.__cause__ if isinstance(exc, RedisUnavailable) and exc.__cause__ else exc
    if isinstance(cause, AuthenticationError) or (
        isinstance(cause, ResponseError) and str(cause).startswith(("NOAUTH", "WRONGPASS"))
    ):
        return 2, (f"Redis at {where} refused the credentials: {cause} (check redis.url, "
                   "redis.username and redis.password or redis.password_file)")
    if isinstance(cause, NoPermissionError):
        return 1, (f"the Redis user of {where} may not do this: {cause} "
                   "(see the README's minimal ACL)")
    if isinstance(exc, ConfigError):
        return 2, f"config error: {exc}"
    if isinstance(exc, UsageError):
        return 2, str(exc)
    if isinstance(exc, RedisUnavailable):
        return 1, str(exc)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        return 1, f"cannot reach Redis at {where}: {exc}"
    if isinstance(exc, RedisError):
        return 1, f"Redis at {where} answered with an error: {exc}"
    if isinstance(exc, RsagaError):
        return 1, str(exc)
    return 1, (f"unexpected {type(exc).__name__}: {exc} "
               "(RSAGA_LOG_LEVEL=DEBUG logs the traceback)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rsaga`` console script; returns the exit code."""
    # Handlers named by import path are found from where rsaga runs, as celery does.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(signal, "SIGPIPE") and args.command not in _SERVICES:
        # `rsaga ... | head` ends quietly; a service keeps Python's default
        # (ignored), or a peer closing any socket would kill it.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.command is None:
        parser.print_help()
        return 2
    where = "the configured Redis"
    try:
        settings = load_settings(args.config)
        where = redact_url(settings.redis.url) or "embedded fakeredis"
        logs.configure(settings.logging.format, settings.logging.level)
        run: Handler = args.run
        return anyio.run(run, args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        leaf = _leaf(exc)
        logging.getLogger("rsaga.cli").debug("%s failed", args.command, exc_info=leaf)
        code, message = _explain(leaf, where)
        _error(message)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
