"""The process indexes: per-type health checks (average duration, age, retries), the index
of process types, and process search; on fakeredis and on a real Redis."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from index_plugins import Errand, PatientErrand, Stepped
from redis.asyncio import Redis

from rsaga import EventStore, Keyspace
from rsaga.cli import main
from rsaga.clock import ManualClock
from rsaga.config import HealthSettings
from rsaga.errors import ValidationError
from rsaga.events import EventRegistry
from rsaga.health import (
    FORGET_DEAD_AFTER_MS,
    Heartbeat,
    health_report,
    keep_heartbeat,
    process_thresholds,
    write_heartbeat,
)
from rsaga.inspect import Page, SearchRow, process_types, search_processes
from rsaga.metrics import PrometheusObserver
from rsaga.process.index import IndexUpdate
from rsaga.store import Effects, StreamWrite
from rsaga.testing import Driver

TYPES = [Errand, PatientErrand]


async def _driver(redis: Redis, prefix: str, shards: int = 1) -> Driver:
    store = EventStore(redis, EventRegistry([Stepped]), keyspace=Keyspace(prefix, shards))
    # The manual clock runs an hour ahead of Redis's: timeouts it schedules are never
    # overdue for health, which reads the server's clock.
    clock = ManualClock(int(time.time() * 1000) + 3_600_000)
    driver = Driver(store, [Errand(), PatientErrand()], clock=clock)
    # A live worker, so that health judges the processes, not the missing worker.
    await write_heartbeat(redis, store.keyspace, Heartbeat("w1", "host", 1, [], 0.0), 600)
    return driver


async def _start(driver: Driver, *ids: str, process_type: str = "errand") -> None:
    for process_id in ids:
        await driver.processes.start(process_type, process_id)


async def _report(driver: Driver, settings: HealthSettings) -> tuple[int, list[str]]:
    report = await health_report(
        driver.store.redis, driver.store.keyspace, settings, process_thresholds(settings, TYPES)
    )
    return report.exit_code, report.problems


async def _search(driver: Driver, settings: HealthSettings, state: str) -> Page[SearchRow]:
    return await search_processes(
        driver.store.redis, driver.store.keyspace, state=state, settings=settings,
        thresholds=process_thresholds(settings, TYPES),
    )


async def _gauges(driver: Driver, settings: HealthSettings, gauge: str) -> dict[str, float]:
    """The values of the per-type gauge `gauge` after a refresh from Redis."""
    observer = PrometheusObserver()
    types = ["errand", "patient-errand"]
    await observer.refresh(
        driver.store.redis, driver.store.keyspace, process_types=types,
        thresholds=process_thresholds(settings, TYPES),
    )
    metric = getattr(observer, gauge)
    return {t: metric.labels(t)._value.get() for t in types}


async def test_a_stream_id_holding_stats_makes_no_phantom_process_type(
    redis: Redis, prefix: str
) -> None:
    driver = await _driver(redis, prefix)
    await driver.store.append("x:stats:phantom", [Stepped()])
    await driver.store.append("y:stats:", [Stepped()])
    await _start(driver, "1")
    assert await process_types(redis, driver.store.keyspace) == ["errand"]
    report = await health_report(redis, driver.store.keyspace, HealthSettings())
    assert [p.process_type for p in report.processes] == ["errand"]
    assert report.status == "ok", report.problems


async def test_the_process_types_index_spans_shards(redis: Redis, prefix: str) -> None:
    driver = await _driver(redis, prefix, shards=4)
    await _start(driver, *(str(i) for i in range(8)))
    await _start(driver, "p", process_type="patient-errand")
    ks = driver.store.keyspace
    assert await process_types(redis, ks) == ["errand", "patient-errand"]
    report = await health_report(redis, ks, HealthSettings())
    assert [(p.process_type, p.active) for p in report.processes] == [
        ("errand", 8), ("patient-errand", 1)
    ]


async def test_a_type_slower_on_average_than_its_threshold_warns_until_faster_ones_finish(
    redis: Redis, prefix: str
) -> None:
    driver = await _driver(redis, prefix)
    settings = HealthSettings(average_duration_warning=30)
    await _start(driver, "slow")
    await _start(driver, "slow", process_type="patient-errand")
    await driver.advance(40)  # the manual clock: durations count on the worker's clock
    await driver.processes.advance("errand", "slow", "done")
    await driver.processes.advance("patient-errand", "slow", "done")
    code, problems = await _report(driver, settings)
    assert code == 1
    # patient-errand's own threshold (3600 s) holds though the default (30 s) would flag it
    assert problems == ["slow processes for errand: mean 40 s, threshold 30 s"]
    for fast in ("f1", "f2", "f3"):
        await _start(driver, fast)
        await driver.processes.advance("errand", fast, "done")
    assert await _report(driver, settings) == (0, [])


async def test_processes_older_than_the_max_age_warn_by_id_until_they_finish(
    redis: Redis, prefix: str
) -> None:
    driver = await _driver(redis, prefix)
    settings = HealthSettings(max_process_age=1)
    await _start(driver, "a1", "a2")
    await _start(driver, "p1", process_type="patient-errand")
    assert await _report(driver, settings) == (0, [])
    await anyio.sleep(1.3)  # ages count on the Redis server's clock
    await _start(driver, "young")
    code, problems = await _report(driver, settings)
    assert code == 1
    [problem] = problems
    assert problem.startswith("2 errand processes older than 1 s: errand-a")
    assert "errand-a1 (" in problem
    assert "errand-a2 (" in problem
    assert "young" not in problem
    assert "patient" not in problem
    page = await _search(driver, settings, "old")
    assert sorted(r.stream_id for r in page.items) == ["errand-a1", "errand-a2"]
    assert await _gauges(driver, settings, "over_age") == {"errand": 2, "patient-errand": 0}
    for process_id in ("a1", "a2"):
        await driver.processes.advance("errand", process_id, "done")
    assert await _report(driver, settings) == (0, [])


async def test_health_lists_at_most_20_offenders_with_the_total(
    redis: Redis, prefix: str
) -> None:
    driver = await _driver(redis, prefix)
    await _start(driver, *(f"n{i:02}" for i in range(25)))
    await anyio.sleep(1.3)
    report = await health_report(redis, driver.store.keyspace, HealthSettings(max_process_age=1))
    [errand] = report.processes
    assert (errand.over_age, len(errand.oldest)) == (25, 20)
    assert report.problems[0].endswith(" and 5 more")


async def test_a_step_retried_too_often_warns_with_step_and_count_until_it_succeeds(
    redis: Redis, prefix: str
) -> None:
    driver = await _driver(redis, prefix)
    settings = HealthSettings(max_retry_count=2)
    await _start(driver, "r1", "ok")
    await _start(driver, "p1", process_type="patient-errand")
    await driver.processes.advance("errand", "r1", "fail")
    await driver.processes.advance("patient-errand", "p1", "fail")
    assert await _report(driver, settings) == (0, [])  # one retry each: under 2
    await driver.advance(1.5)  # the retries fire and fail again: two retries each
    code, problems = await _report(driver, settings)
    assert code == 1
    assert problems == [
        "1 errand processes retried at least 2 times: errand-r1 (step charge, 2 retries)"
    ]
    page = await _search(driver, settings, "retrying")
    assert [(r.stream_id, r.retry_step, r.retries) for r in page.items] == [
        ("errand-r1", "charge", 2)
    ]
    assert await _gauges(driver, settings, "retrying") == {"errand": 1, "patient-errand": 0}
    await driver.processes.advance("errand", "r1", "heal")
    await driver.advance(1.5)  # the retry fires and succeeds: no longer retrying
    assert await _report(driver, settings) == (0, [])
    page = await search_processes(redis, driver.store.keyspace, state="retrying")
    assert [r.stream_id for r in page.items] == ["patient-errand-p1"]


async def test_search_by_state_correlation_prefix_and_time_pages_newest_first(
    redis: Redis, prefix: str
) -> None:
    driver = await _driver(redis, prefix, shards=2)
    ks = driver.store.keyspace
    before = datetime.now(UTC) - timedelta(seconds=5)
    for i in range(7):
        await _start(driver, f"order-{i}")
        await anyio.sleep(0.002)  # distinct start times: a strict order to check
    for i in (1, 4):
        await driver.processes.advance("errand", f"order-{i}", "done")
    await _start(driver, "other", process_type="patient-errand")

    page = await search_processes(redis, ks, types=["errand"], state="active", limit=3)
    assert [r.stream_id for r in page.items] == ["errand-order-6", "errand-order-5",
                                                 "errand-order-3"]
    assert page.cursor is not None
    page = await search_processes(
        redis, ks, types=["errand"], state="active", limit=3, cursor=page.cursor
    )
    assert [r.stream_id for r in page.items] == ["errand-order-2", "errand-order-0"]
    assert page.cursor is None

    done = await search_processes(redis, ks, state="completed")
    assert [r.stream_id for r in done.items] == ["errand-order-4", "errand-order-1"]
    assert all(r.finished_at and r.started_at and r.finished_at >= r.started_at
               for r in done.items)

    everything = await search_processes(redis, ks, state=None, limit=100)
    assert len(everything.items) == 8
    row = next(r for r in everything.items if r.stream_id == "errand-order-3")
    assert row.correlation_id
    by_correlation = await search_processes(redis, ks, state=None,
                                            correlation_id=row.correlation_id)
    assert [r.stream_id for r in by_correlation.items] == ["errand-order-3"]
    assert (await search_processes(redis, ks, correlation_id="nope")).items == []

    by_prefix = await search_processes(redis, ks, state=None, id_prefix="order-")
    # finished processes by end (after every start here), unfinished ones by start
    assert [r.stream_id for r in by_prefix.items] == [f"errand-order-{i}" for i in
                                                      (4, 1, 6, 5, 3, 2, 0)]
    assert [r.stream_id for r in (await search_processes(
        redis, ks, state="completed", id_prefix="order-4")).items] == ["errand-order-4"]

    assert len((await search_processes(redis, ks, state=None, started_after=before)).items) == 8
    assert (await search_processes(redis, ks, state=None, started_before=before)).items == []
    finished = await search_processes(redis, ks, state=None, finished_after=before)
    assert sorted(r.stream_id for r in finished.items) == ["errand-order-1", "errand-order-4"]


async def test_search_refuses_bad_input(redis: Redis, prefix: str) -> None:
    ks = Keyspace(prefix)
    with pytest.raises(ValidationError, match="state must be one of"):
        await search_processes(redis, ks, state="sleeping")
    with pytest.raises(ValidationError, match="cursor"):
        await search_processes(redis, ks, cursor="garbage")
    with pytest.raises(ValidationError, match="time zone"):
        await search_processes(redis, ks, started_after=datetime(2026, 1, 1))
    with pytest.raises(ValidationError, match="limit"):
        await search_processes(redis, ks, limit=0)
    with pytest.raises(ValidationError, match="no process type can be named 'a:b'"):
        await search_processes(redis, ks, types=["a:b"])
    with pytest.raises(ValidationError, match="correlation_id must be a non-empty str"):
        await search_processes(redis, ks, correlation_id="")


# --- the command line against a real Redis -----------------------------------------------


@pytest.fixture
def cli_env(
    env: Path, monkeypatch: pytest.MonkeyPatch, real_redis_url: str
) -> pytest.MonkeyPatch:
    """A clean RSAGA_* environment on the real Redis, under the test's prefix."""
    monkeypatch.setenv("RSAGA_REDIS_URL", real_redis_url)
    return monkeypatch


async def _offend(url: str, prefix: str, check: str) -> None:
    """Make one errand and one patient errand cross the default threshold of `check`."""
    redis = Redis.from_url(url)
    try:
        driver = await _driver(redis, prefix)
        await _start(driver, "e1")
        await _start(driver, "p1", process_type="patient-errand")
        if check == "average_duration_warning":
            await driver.advance(40)
            await driver.processes.advance("errand", "e1", "done")
            await driver.processes.advance("patient-errand", "p1", "done")
        elif check == "max_process_age":
            await anyio.sleep(1.3)
        else:
            for process_type in ("errand", "patient-errand"):
                await driver.processes.advance(process_type, "e1" if process_type == "errand"
                                               else "p1", "fail")
            await driver.advance(1.5)
    finally:
        await redis.aclose()


async def _clear(url: str, prefix: str, check: str) -> None:
    """Remove the cause: fast errands finish, the old one finishes, the retried one heals."""
    redis = Redis.from_url(url)
    try:
        driver = await _driver(redis, prefix)
        if check == "average_duration_warning":
            for fast in ("f1", "f2", "f3"):
                await _start(driver, fast)
                await driver.processes.advance("errand", fast, "done")
        elif check == "max_process_age":
            await driver.processes.advance("errand", "e1", "done")
        else:
            await driver.processes.advance("errand", "e1", "heal")
            driver.clock.advance(3)  # past the pending retry (the manual clock is fresh here)
            await driver.run_until_idle()
    finally:
        await redis.aclose()


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        ("average_duration_warning", "30", "slow processes for errand: mean 40 s, threshold 30 s"),
        ("max_process_age", "1", "1 errand processes older than 1 s: errand-e1 ("),
        ("max_retry_count", "2",
         "1 errand processes retried at least 2 times: errand-e1 (step charge, 2 retries)"),
    ],
)
def test_cli_health_flags_a_check_per_type_until_its_cause_clears(
    check: str,
    value: str,
    message: str,
    cli_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    real_redis_url: str,
    prefix: str,
) -> None:
    cli_env.setenv("RSAGA_HANDLERS", "index_plugins:Errand,index_plugins:PatientErrand")
    config = tmp_path / "rsaga.toml"
    config.write_text(f"[health]\n{check} = {value}\n")
    cli = ["--config", str(config)]
    anyio.run(_offend, real_redis_url, prefix, check)
    capsys.readouterr()
    assert main([*cli, "health"]) == 1
    out = capsys.readouterr().out
    assert message in out
    assert "patient-errand-p1" not in out
    assert "slow processes for patient" not in out
    assert main([*cli, "health", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [p for p in report["problems"] if message in p]
    if check != "average_duration_warning":
        state = "old" if check == "max_process_age" else "retrying"
        assert main([*cli, "process", "list", "--state", state, "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [row["stream_id"] for row in listed["items"]] == ["errand-e1"]
    anyio.run(_clear, real_redis_url, prefix, check)
    assert main([*cli, "health"]) == 0, capsys.readouterr().out


async def _three_errands(url: str, prefix: str) -> None:
    redis = Redis.from_url(url)
    try:
        driver = await _driver(redis, prefix)
        for process_id in ("e1", "e2", "e3", "x1"):
            await _start(driver, process_id)
            await anyio.sleep(0.002)
        await driver.processes.advance("errand", "e2", "done")
    finally:
        await redis.aclose()


def test_cli_process_list_searches_and_pages(
    cli_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    real_redis_url: str,
    prefix: str,
) -> None:
    anyio.run(_three_errands, real_redis_url, prefix)
    listing = ["process", "list", "--state", "any", "--id-prefix", "e", "--limit", "2"]
    assert main([*listing, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert [r["stream_id"] for r in first["items"]] == ["errand-e2", "errand-e3"]
    assert first["items"][0]["state"] == "completed"
    assert main([*listing, "--json", "--cursor", first["cursor"]]) == 0
    second = json.loads(capsys.readouterr().out)
    assert ([r["stream_id"] for r in second["items"]], second["cursor"]) == (["errand-e1"], None)
    assert main(listing) == 0
    text = capsys.readouterr().out
    assert f"more: --cursor {first['cursor']}" in text
    assert main(["process", "list", "--correlation", first["items"][1]["correlation_id"]]) == 0
    assert capsys.readouterr().out.startswith("errand-e3 ")
    assert main(["process", "list", "--started-before", "2000-01-01"]) == 0
    assert capsys.readouterr().out.strip() == "no active processes found"
    with pytest.raises(SystemExit) as exit_:
        main(["process", "list", "--started-after", "yesterday"])
    assert exit_.value.code == 2
    assert "must be an ISO 8601 time" in capsys.readouterr().err


async def test_a_saga_retrying_a_compensation_counts_as_retrying_until_it_gives_up(
    redis: Redis, prefix: str
) -> None:
    from test_process_correctness import SyncTrip, run_trip

    store, driver, _ = await run_trip(
        redis, prefix, SyncTrip(), {"car": "domain", "undo flight": "domain"}
    )
    retrying = store.keyspace.retrying_processes(0, "sync-trip")
    # the first attempt of undoing the flight failed: its retry (attempt 2) is 1 retry
    assert await redis.zrange(retrying, 0, -1, withscores=True) == [(b"sync-trip-1", 1.0)]
    await driver.advance(1.0)
    page = await search_processes(redis, store.keyspace, state="retrying")
    assert [(r.stream_id, r.retry_step, r.retries) for r in page.items] == [
        ("sync-trip-1", "retry-compensation:flight", 2)
    ]
    await driver.advance(1.0)  # the last attempt fails: the saga ends failed
    assert await redis.zcard(retrying) == 0
    page = await search_processes(redis, store.keyspace, state="failed")
    assert [(r.stream_id, r.retries) for r in page.items] == [("sync-trip-1", 0)]


async def test_finished_processes_beyond_the_last_10000_leave_every_index(
    real_redis_url: str, prefix: str
) -> None:
    # real Redis only: 10,003 commits into 10,000-long sorted sets take a minute on
    # fakeredis's Lua, against seconds here
    redis = Redis.from_url(real_redis_url)
    try:
        await _fill_past_the_finished_bound(redis, prefix)
    finally:
        await redis.aclose()


async def _fill_past_the_finished_bound(redis: Redis, prefix: str) -> None:
    store = EventStore(redis, EventRegistry([Stepped]), keyspace=Keyspace(prefix))
    ks = store.keyspace

    async def finish(n: int) -> None:
        stream_id = f"quick-{n}"
        update = IndexUpdate("quick", stream_id, "complete", starts=True,
                             correlation_id=f"c{n}")
        await store.commit([StreamWrite(stream_id, 0, [Stepped()])],
                           effects=Effects(index=[update]))

    async def finish_every(lane: int) -> None:
        for n in range(lane, 10_003, 32):
            await finish(n)

    async with anyio.create_task_group() as tg:
        for lane in range(32):
            tg.start_soon(finish_every, lane)
    kept = await redis.zrange(ks.finished_processes(0, "quick", "completed"), 0, -1)
    assert len(kept) == 10_000
    forgotten = {f"quick-{n}".encode() for n in range(10_003)} - set(kept)
    assert len(forgotten) == 3
    assert await redis.hlen(ks.process_records(0, "quick")) == 10_000
    assert await redis.zcard(ks.processes_by_id(0, "quick")) == 10_000
    assert await redis.zcard(ks.processes_by_correlation(0, "quick")) == 10_000
    assert await redis.hmget(ks.process_records(0, "quick"), list(forgotten)) == [None] * 3
    gone = forgotten.pop().decode()
    page = await search_processes(redis, ks, state=None, id_prefix=gone.split("-")[1])
    assert gone not in [r.stream_id for r in page.items]
    assert (await redis.hgetall(ks.process_stats(0, "quick")))[b"started"] == b"10003"


def test_cli_old_without_a_max_age_says_how_to_set_one(
    cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["process", "list", "--state", "old"]) == 2
    assert "set health.max_process_age" in capsys.readouterr().err


def test_no_stream_id_names_a_key_of_another_kind() -> None:
    ks = Keyspace("app", shards=1)
    others = {
        *ks.process_index(0, "t"), *ks.process_index(0, "s"), ks.log(0), ks.dead_letters(0),
        ks.timeouts(0), ks.timeout_data(0), ks.timeouts_wake(0), ks.due_timeouts(0),
        ks.stream_owners(0, "g"), ks.in_flight(0, "g"), ks.consumers_alive(0, "g"),
        ks.handoffs(0, "g"), ks.heartbeats(), ks.heartbeat("w"),
    }
    hostile = ["x:stats:t", "stats:t", "t", ":active:t", "{0}:log", "process-types",
               "s:x", "records:t", "by-id:t"]
    for stream_id in hostile:
        assert ks.stream(stream_id) not in others
    assert not [k for k in others if k.startswith("app:{0}:s:")]


async def test_heartbeats_are_found_through_their_index_and_leave_it_on_stop(
    redis: Redis, prefix: str
) -> None:
    ks = Keyspace(prefix)
    beat = Heartbeat("w-index", "host", 1, [], 0.0)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_heartbeat, redis, ks, beat, 30.0, stop)
        with anyio.fail_after(5):
            while not await redis.zscore(ks.heartbeats(), "w-index"):
                await anyio.sleep(0.01)
        report = await health_report(redis, ks, HealthSettings())
        assert [w.consumer for w in report.workers] == ["w-index"]
        stop.set()
    assert await redis.zscore(ks.heartbeats(), "w-index") is None
    assert not await redis.exists(ks.heartbeat("w-index"))
    # a consumer that died an hour ago is forgotten by the next renewal of a live one
    await redis.zadd(ks.heartbeats(), {"long-dead": time.time() * 1000 - FORGET_DEAD_AFTER_MS - 1})
    await write_heartbeat(redis, ks, beat, 30.0)
    assert await redis.zrange(ks.heartbeats(), 0, -1) == [b"w-index"]
    assert [w.consumer for w in (await health_report(redis, ks, HealthSettings())).workers] == [
        "w-index"
    ]
