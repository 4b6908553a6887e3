"""The ``rsaga`` command line.

Exit codes: 0 success, 1 failure at run time (Redis unreachable, a check that
failed), 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
import msgspec

import rsaga
from rsaga import logs
from rsaga.config import Settings, load_settings, redact_url
from rsaga.connection import connect, embedded, ping
from rsaga.deadletters import DeadLetters
from rsaga.errors import ConfigError, RsagaError
from rsaga.events import EventRegistry
from rsaga.executor import Executor
from rsaga.handlers import InstalledHandler, discover_handlers
from rsaga.health import health_report, report_lines
from rsaga.inspect import (
    STATES,
    list_processes,
    list_timeouts,
    process_types,
    read_events,
    show_process,
)
from rsaga.keyspace import Keyspace
from rsaga.metrics import PrometheusObserver, refresh_loop, serve_metrics
from rsaga.observe import NO_OBSERVER
from rsaga.permissions import minimal_acl, missing_permissions
from rsaga.processes import FRAMEWORK_EVENTS, ProcessManager
from rsaga.sagas import SAGA_EVENTS
from rsaga.scheduler import Scheduler
from rsaga.scripts import all_scripts
from rsaga.store import EventStore
from rsaga.worker import Worker

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def _print(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


async def _check(args: argparse.Namespace, settings: Settings) -> int:
    """Connect, check the user's permissions, load every script, print the deployment."""
    redis = connect(settings.redis)
    where = redact_url(settings.redis.url)
    keyspace = Keyspace(prefix=settings.store.prefix, shards=settings.store.shards)
    try:
        info = await ping(redis, where)
        missing = await missing_permissions(redis, keyspace)
        for script in [] if missing else all_scripts():
            await script.load(redis)
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
        f"scripts    {len(all_scripts())} loaded",
        "ok",
    )
    return 0


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    """Run order fulfilment processes and travel sagas end to end, then summarise."""
    from handlers.demo import run_demo

    if "RSAGA_LOG_LEVEL" not in os.environ:
        logging.getLogger("rsaga").setLevel(logging.WARNING)  # the table tells the story

    if settings.redis.url:
        redis = connect(settings.redis)
        target = redact_url(settings.redis.url)
        await ping(redis, target)
    else:
        if args.drive_only:
            raise ConfigError("--drive-only needs the workers' Redis: set RSAGA_REDIS_URL")
        redis = embedded()
        target = "embedded fakeredis (set RSAGA_REDIS_URL to use a real server)"
    where = "workers elsewhere" if args.drive_only else "a worker and a scheduler in this process"
    _print(
        f"rsaga demo: {args.orders} orders and {args.trips} trips "
        f"({args.failure_rate:.0%} set to fail, {args.timeout_rate:.0%} to time out)",
        f"on {target}, with {where}",
        "",
    )
    try:
        report = await run_demo(
            redis,
            orders=args.orders,
            trips=args.trips,
            failure_rate=args.failure_rate,
            timeout_rate=args.timeout_rate,
            seed=args.seed,
            prefix=settings.store.prefix if args.drive_only else settings.store.prefix + "-demo",
            drive_only=args.drive_only,
        )
    finally:
        await redis.aclose()
    _print("", *report.lines())
    return 0 if report.ok else 1


def _store(settings: Settings) -> EventStore:
    return EventStore(
        connect(settings.redis),
        EventRegistry(),
        keyspace=Keyspace(prefix=settings.store.prefix, shards=settings.store.shards),
        max_event_bytes=settings.store.max_event_bytes,
        page_size=settings.store.read_page_size,
    )


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
        _print("no handlers installed (entry points 'rsaga.handlers' or worker.handlers)")
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
        raise ConfigError("no handlers to run: install some or set worker.handlers")
    worker_settings = settings.worker
    if args.concurrency:
        worker_settings = msgspec.structs.replace(worker_settings, concurrency=args.concurrency)
    store = _store(settings)
    await ping(
        store.redis, redact_url(settings.redis.url), wait=settings.redis.connect_timeout,
        keyspace=store.keyspace,
    )
    observer = PrometheusObserver() if args.metrics_port else None
    worker = Worker(
        Executor(store, retry=settings.executor.retry, observer=observer or NO_OBSERVER),
        [item.handler() for item in selected],
        settings=worker_settings,
    )
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, stop)
            if observer is not None:
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
                    )
                )
            await worker.run(stop)
            tg.cancel_scope.cancel()
    finally:
        await store.redis.aclose()
    return 0


async def _scheduler(args: argparse.Namespace, settings: Settings) -> int:
    """Move due timeouts to the due streams until SIGTERM or SIGINT."""
    store = _store(settings)
    await ping(
        store.redis, redact_url(settings.redis.url), wait=settings.redis.connect_timeout,
        keyspace=store.keyspace,
    )
    observer = PrometheusObserver() if args.metrics_port else None
    scheduler = Scheduler(
        store.redis,
        store.keyspace,
        batch_size=args.batch_size or settings.scheduler.batch_size,
        max_sleep=settings.scheduler.max_sleep,
        heartbeat_ttl=settings.scheduler.heartbeat_ttl,
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


def _inspection_store(settings: Settings) -> EventStore:
    """A store whose registry knows every installed handler's and process's events."""
    store = _store(settings)
    registry = store.registry
    registry.register(*FRAMEWORK_EVENTS, *SAGA_EVENTS)
    for item in discover_handlers(settings.worker.handlers):
        handler: Any = item.handler
        if issubclass(handler, ProcessManager):
            handler.validate()
            registry.register(*handler.state_events)
        registry.register(*handler.events, *handler.decodes)
    return store


def _json(value: Any) -> str:
    return msgspec.json.encode(value, enc_hook=str).decode()


async def _health(args: argparse.Namespace, settings: Settings) -> int:
    """Health from Redis; exit 0 ok, 1 warning, 2 critical."""
    store = _store(settings)
    try:
        await ping(store.redis, redact_url(settings.redis.url), keyspace=store.keyspace)
        report = await health_report(store.redis, store.keyspace, settings.health)
    finally:
        await store.redis.aclose()
    if args.json:
        _print(_json(report))
    else:
        _print(*report_lines(report))
    return report.exit_code


async def _process(args: argparse.Namespace, settings: Settings) -> int:
    """List processes, or show one."""
    store = _inspection_store(settings)
    try:
        if args.action == "show":
            view = await show_process(store, args.id)
            if view is None:
                print(f"rsaga: no process with stream {args.id!r}", file=sys.stderr)
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
        types = [args.type] if args.type else await process_types(store.redis, store.keyspace)
        rows = await list_processes(
            store.redis, store.keyspace, types=types, state=args.state, limit=args.limit,
            stuck_after=settings.health.stuck_after,
        )
        if args.json:
            _print(_json(rows))
        elif not rows:
            _print(f"no {args.state} processes")
        for row in [] if args.json else rows:
            _print(f"{row.stream_id:<48} {row.state:<10} {row.at:%Y-%m-%d %H:%M:%S}")
        return 0
    finally:
        await store.redis.aclose()


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
    store = _inspection_store(settings)
    try:
        rows = await read_events(store, args.id, from_version=args.from_version, limit=args.limit)
    finally:
        await store.redis.aclose()
    if args.json:
        _print(_json(rows))
        return 0
    if not rows:
        print(f"rsaga: stream {args.id!r} has no events from version {args.from_version}",
              file=sys.stderr)
        return 1
    for e in rows:
        at = f"{e.occurred_at:%Y-%m-%d %H:%M:%S.%f}"[:-3] if e.occurred_at else "?"
        _print(f"{e.version:>5}  {at}  {e.type:<32} {e.data}  corr={e.correlation_id}")
    return 0


async def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    """List, replay or drop dead letters."""
    store = _store(settings)
    letters = DeadLetters(store.redis, store.keyspace)
    try:
        if args.action == "list":
            found = await letters.list(shard=args.shard, limit=args.limit)
            if args.json:
                _print(msgspec.json.encode(found).decode())
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
                _print(f"replayed {await letters.replay_all(shard=args.shard)}")
            else:
                _print(f"dropped {await letters.drop_all(shard=args.shard)}")
            return 0
        if not args.id:
            raise ConfigError(f"dlq {args.action}: give an ID or --all")
        shard = args.shard or 0
        if args.action == "replay":
            new_log_id = await letters.replay(args.id, shard=shard)
            _print(f"replayed as log entry {new_log_id}" if new_log_id else "no such dead letter")
            return 0 if new_log_id else 1
        dropped = await letters.drop(args.id, shard=shard)
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rsaga`` command."""
    parser = argparse.ArgumentParser(
        prog="rsaga",
        description="Long-running business processes on Redis Streams, event sourced.",
    )
    parser.add_argument("--version", action="version", version=f"rsaga {rsaga.__version__}")
    parser.add_argument(
        "--config", metavar="PATH", help="config file (default: $RSAGA_CONFIG or config/rsaga.toml)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser("check", help="connect to Redis, load the scripts, print the setup")
    check.set_defaults(run=_check)

    demo = commands.add_parser("demo", help="run the demo (embedded fakeredis unless configured)")
    demo.add_argument("--orders", type=_count, default=100, help="order fulfilment processes")
    demo.add_argument("--trips", type=_count, default=100, help="travel-booking sagas")
    demo.add_argument("--failure-rate", type=_rate, default=0.2)
    demo.add_argument("--timeout-rate", type=_rate, default=0.1)
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument(
        "--drive-only",
        action="store_true",
        help="only start processes and watch: workers and a scheduler run elsewhere (Procfile)",
    )
    demo.set_defaults(run=_demo)

    handlers = commands.add_parser("handlers", help="list installed handlers and their source")
    handlers.set_defaults(run=_handlers)

    worker = commands.add_parser("worker", help="run event handlers until SIGTERM or SIGINT")
    worker.add_argument(
        "--handler", action="append", metavar="NAME", help="run only this handler (repeatable)"
    )
    worker.add_argument("--concurrency", type=_positive, help="events handled at once")
    worker.add_argument(
        "--metrics-port", type=_positive, help="serve Prometheus metrics on this port"
    )
    worker.set_defaults(run=_worker)

    scheduler = commands.add_parser(
        "scheduler", help="move due timeouts to the workers until SIGTERM or SIGINT"
    )
    scheduler.add_argument("--batch-size", type=_positive, help="timeouts moved per call")
    scheduler.add_argument(
        "--metrics-port", type=_positive, help="serve Prometheus metrics on this port"
    )
    scheduler.set_defaults(run=_scheduler)

    health = commands.add_parser(
        "health", help="health from Redis; exit 0 ok, 1 warning, 2 critical"
    )
    health.add_argument("--json", action="store_true")
    health.set_defaults(run=_health)

    process = commands.add_parser("process", help="list processes or show one")
    process_actions = process.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = process_actions.add_parser("list", help="processes by state")
    listing.add_argument("--type", help="one process type (default: all)")
    listing.add_argument("--state", choices=STATES, default="active")
    listing.add_argument("--limit", type=_positive, default=50)
    listing.add_argument("--json", action="store_true")
    showing = process_actions.add_parser("show", help="one process: history, state, timeouts")
    showing.add_argument("id", help="the process's stream id, e.g. order-fulfilment-17")
    showing.add_argument("--json", action="store_true")
    process.set_defaults(run=_process)

    timeouts = commands.add_parser("timeouts", help="scheduled timeouts")
    timeouts.add_argument("action", choices=["list"])
    timeouts.add_argument("--limit", type=_positive, default=50)
    timeouts.add_argument("--json", action="store_true")
    timeouts.set_defaults(run=_timeouts)

    stream = commands.add_parser("stream", help="the events of one stream")
    stream.add_argument("action", choices=["show"])
    stream.add_argument("id", help="stream id")
    stream.add_argument("--from", dest="from_version", type=_positive, default=1)
    stream.add_argument("--limit", type=_positive, default=100)
    stream.add_argument("--json", action="store_true")
    stream.set_defaults(run=_stream)

    dlq = commands.add_parser("dlq", help="list, replay or drop dead letters")
    dlq.add_argument("action", choices=["list", "replay", "drop"])
    dlq.add_argument("id", nargs="?", help="dead-letter id (replay, drop)")
    dlq.add_argument("--all", action="store_true", help="replay or drop every dead letter")
    dlq.add_argument("--shard", type=int, default=None)
    dlq.add_argument("--limit", type=_positive, default=100)
    dlq.add_argument("--json", action="store_true")
    dlq.set_defaults(run=_dlq)

    web = commands.add_parser(
        "web", help="serve the operator console (read-only unless web.token is set)"
    )
    web.add_argument("--host", help="address to listen on (default: web.host, 127.0.0.1)")
    web.add_argument("--port", type=_positive, help="port to listen on (default: web.port, 8080)")
    web.set_defaults(run=_web)
    return parser


_SERVICES = ("worker", "scheduler", "web")
"""Long-running commands: they talk to many peers and must outlive each one."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rsaga`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(signal, "SIGPIPE") and args.command not in _SERVICES:
        # `rsaga ... | head` ends quietly; a service keeps Python's default
        # (ignored), or a peer closing any socket would kill it.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        settings = load_settings(args.config)
        logs.configure(settings.logging.format, settings.logging.level)
        run: Handler = args.run
        return anyio.run(run, args, settings)
    except ConfigError as exc:
        print(f"rsaga: config error: {exc}", file=sys.stderr)
        return 2
    except RsagaError as exc:
        print(f"rsaga: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
