"""The operator console, in process (fakeredis and real Redis): pages, escaping, the token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from rsaga_examples.demo import DemoOrders, DemoTravel, demo_store, run_demo
from rsaga_examples.orders import OrderPlaced

from rsaga.config import Settings, StoreSettings
from rsaga.processes import ProcessFailed, ProcessStarted, ProcessTerminated
from rsaga.store import EventStore
from rsaga.testing import Driver
from rsaga.web import create_app

TOKEN = "s3cret-operator-token"
HOSTILE_ID = "x<script>alert(1)</script>"


async def _plant_dead_letter(redis: Redis, store: EventStore, **fields: str) -> str:
    defaults = {
        "handler": "payment-service", "s": "order-1", "v": "1", "log_id": "1-0",
        "error_type": "ValueError", "error": "boom", "traceback": "Traceback...",
        "attempts": "3", "deliveries": "3", "failed_at_ms": "1700000000000", "t": "x", "d": "",
    }
    entry_id: bytes = await redis.xadd(store.keyspace.dead_letters(0), {**defaults, **fields})
    return entry_id.decode()


@pytest.fixture
async def demo(redis: Redis, prefix: str) -> EventStore:
    """A finished demo run (orders and trips, some failing) under this test's prefix."""
    report = await run_demo(
        redis, orders=4, trips=6, failure_rate=0.4, timeout_rate=0.0, seed=7, prefix=prefix,
        progress=lambda line: None,
    )
    assert report.ok, "\n".join(report.lines())
    return demo_store(redis, prefix)


async def _client(store: EventStore, token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(store=StoreSettings(prefix=store.keyspace.prefix))
    app = create_app(settings, token=token, open_store=lambda _: store,
                     managers=[DemoOrders(), DemoTravel()])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            yield client


@pytest.fixture
async def console(demo: EventStore) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(demo, TOKEN):
        yield client


@pytest.fixture
async def read_only(demo: EventStore) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(demo, None):
        yield client


async def test_overview_shows_health_and_each_process_type(console: httpx.AsyncClient) -> None:
    page = await console.get("/")
    assert page.status_code == 200
    assert 'id="process-types"' in page.text
    assert "order-fulfilment" in page.text
    assert "travel-booking" in page.text
    assert "dead letters" in page.text
    as_json: Any = (await console.get("/?format=json")).json()
    types = {p["process_type"]: p for p in as_json["processes"]}
    assert types["travel-booking"]["started"] == 6
    assert as_json["status"] in ("ok", "warning", "critical")


async def test_process_list_filters_and_the_detail_shows_timeline_and_steps(
    console: httpx.AsyncClient,
) -> None:
    listing = await console.get("/processes", params={"type": "travel-booking",
                                                      "state": "completed"})
    assert listing.status_code == 200
    assert 'id="process-list"' in listing.text
    assert "order-fulfilment-" not in listing.text
    first = listing.text.split('href="/processes/', 1)[1].split('"', 1)[0]
    prefixed = await console.get("/processes", params={"type": "travel-booking",
                                                       "state": "completed", "prefix": "nope-"})
    assert "No completed processes" in prefixed.text
    detail = await console.get(f"/processes/{first}")
    assert detail.status_code == 200
    assert 'id="timeline"' in detail.text
    assert "rsaga.ProcessStarted" in detail.text
    assert 'id="saga-steps"' in detail.text
    assert "step-done" in detail.text
    assert 'id="commands"' in detail.text
    missing = await console.get("/processes/no-such-process")
    assert missing.status_code == 404
    bad_state = await console.get("/processes", params={"state": "sideways"})
    assert bad_state.status_code == 400


async def test_a_refresh_gets_only_the_main_part(console: httpx.AsyncClient) -> None:
    whole = await console.get("/timeouts")
    part = await console.get("/timeouts", headers={"X-Rsaga-Fragment": "1"})
    assert "<html" in whole.text
    assert 'data-refresh="2"' in whole.text
    assert part.text.lstrip().startswith("<main")
    assert "<html" not in part.text


async def test_values_from_redis_are_escaped_and_cut(
    demo: EventStore, console: httpx.AsyncClient
) -> None:
    huge = "A" * 1_000_000
    await demo.append(HOSTILE_ID, [ProcessStarted(process_type=f"<img src=x onerror=alert(1)>"
                                                  f"\x1b]0;pwned\x07{huge}", process_id="1")])
    await _plant_dead_letter(
        demo.redis, demo, handler="<script>alert(2)</script>", s=HOSTILE_ID,
        error=f"\x1b]0;title\x07<b>{huge}", traceback=f"<script>{huge}</script>",
    )
    for path in ("/dead-letters", f"/processes/{HOSTILE_ID}"):
        page = await console.get(path)
        assert page.status_code == 200, path
        assert "<script>alert" not in page.text
        assert "<img src=x" not in page.text
        assert "&lt;script&gt;" in page.text or "&lt;img" in page.text
        assert len(page.text) < 100_000, f"{path}: {len(page.text)} characters"
        assert "more characters)" in page.text


async def test_without_a_token_the_console_is_read_only(
    demo: EventStore, read_only: httpx.AsyncClient
) -> None:
    letter = await _plant_dead_letter(demo.redis, demo)
    page = await read_only.get("/dead-letters")
    assert letter in page.text
    assert "Replay" not in page.text
    assert "read-only" in page.text
    for action in ("replay", "drop"):
        refused = await read_only.post(f"/dead-letters/0/{letter}/{action}",
                                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.status_code == 403
    assert (await read_only.post("/sign-in", data={"token": TOKEN})).status_code == 403
    assert await demo.redis.xlen(demo.keyspace.dead_letters(0)) == 1


async def test_actions_need_the_token_and_a_same_site_request(
    demo: EventStore, console: httpx.AsyncClient
) -> None:
    letter = await _plant_dead_letter(demo.redis, demo)
    drop = f"/dead-letters/0/{letter}/drop"
    assert "Replay" not in (await console.get("/dead-letters")).text  # not signed in
    assert (await console.post(drop)).status_code == 403
    wrong = await console.post(drop, headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 403
    await console.post("/sign-in", data={"token": "guess", "back": "/dead-letters"})
    assert (await console.post(drop)).status_code == 403
    signed = await console.post("/sign-in", data={"token": TOKEN, "back": "/dead-letters"})
    assert signed.status_code == 303
    assert TOKEN not in signed.headers["set-cookie"]
    assert "Replay" in (await console.get("/dead-letters")).text
    cross = await console.post(drop, headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    assert await demo.redis.xlen(demo.keyspace.dead_letters(0)) == 1
    done = await console.post(drop, data={"back": "//evil.example/x"})
    assert done.status_code == 303
    assert done.headers["location"].startswith("/?message=dropped")
    assert await demo.redis.xlen(demo.keyspace.dead_letters(0)) == 0
    by_api = await console.post(drop, headers={"Authorization": f"Bearer {TOKEN}",
                                               "Accept": "application/json"})
    assert by_api.json() == {"message": f"no dead letter 0/{letter}"}


async def test_an_operator_terminates_a_waiting_order_from_its_page(
    demo: EventStore, console: httpx.AsyncClient
) -> None:
    driver = Driver(demo, [DemoOrders()])  # no payment service: the order waits
    await demo.append("order-w1", [OrderPlaced("w1", 100)])
    await driver.run_until_idle()
    page = f"/processes/{DemoOrders.name}-w1"
    terminate = f"/actions/terminate/{DemoOrders.name}-w1"
    signal = f"/actions/signal/{DemoOrders.name}-w1"
    shown = await console.get(page)
    assert 'id="process-state"' in shown.text
    assert "PaymentPending" in shown.text
    assert 'id="process-actions"' not in shown.text  # not signed in
    assert (await console.post(terminate, data={"reason": "x"})).status_code == 403
    await console.post("/sign-in", data={"token": TOKEN})
    signed_in = (await console.get(page)).text
    assert 'id="process-actions"' in signed_in
    assert "compensate first" not in signed_in  # an order is no saga

    bearer = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    bad = await console.post(signal, data={"data": "{nope"}, headers=bearer)
    assert bad.json()["message"].startswith("refused: signal data is not JSON")
    done = await console.post(terminate, data={"reason": "fraud"}, headers=bearer)
    assert done.json() == {"message": f"terminated {DemoOrders.name}-w1: failed"}
    history = [e.data for e in (await demo.read(f"{DemoOrders.name}-w1")).events]
    assert ProcessTerminated("fraud", "web console (127.0.0.1)") in history
    assert isinstance(history[-1], ProcessFailed)
    again = await console.post(terminate, data={"reason": "fraud"}, headers=bearer)
    assert "already ended failed" in again.json()["message"]
    assert 'id="process-actions"' not in (await console.get(page)).text  # ended: no actions


async def test_process_search_by_time_range(console: httpx.AsyncClient) -> None:
    query = {"type": "travel-booking", "state": "any"}
    everything = await console.get("/processes", params=query)
    assert everything.text.count('href="/processes/travel-booking-') == 6
    future = await console.get("/processes", params={**query, "started_after": "2999-01-01T00:00"})
    assert 'id="process-list"' not in future.text
    past = await console.get("/processes", params={**query, "started_after": "2000-01-01T00:00",
                                                   "finished_before": "2999-01-01T00:00"})
    assert past.text.count('href="/processes/travel-booking-') == 6
    bad = await console.get("/processes", params={**query, "started_after": "yesterday"})
    assert bad.status_code == 400
    assert "started after: not a time" in bad.text
