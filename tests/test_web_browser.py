"""The operator console in a real headless Chromium, served by `rsaga web` against a real Redis.

Set RSAGA_UPDATE_SCREENSHOTS=1 to refresh the README's screenshots in docs/.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import anyio
import pytest
from redis.asyncio import Redis
from rsaga_examples.demo import DemoOrders, DemoTravel, demo_store, run_demo
from rsaga_examples.orders import OrderPlaced

from rsaga.testing import Driver, ManualClock, free_port, require_real_redis

pytestmark = [pytest.mark.real_redis, pytest.mark.slow]

TOKEN = "browser-test-token"
DOCS = Path(__file__).parent.parent / "docs"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if require_real_redis():
            pytest.fail("RSAGA_REQUIRE_REDIS=1 but chromium is not installed")
        pytest.skip("chromium is not installed")
    return found


class Prepared(NamedTuple):
    trip: str
    """Stream id of a completed trip."""
    order: str
    """Stream id of an order waiting for a payment that never comes."""
    correlation: str
    """The waiting order's correlation id."""


async def _prepare(url: str, prefix: str) -> Prepared:
    """A finished demo run, a waiting order and one dead letter."""
    redis = Redis.from_url(url)
    try:
        report = await run_demo(redis, orders=6, trips=8, failure_rate=0.4, timeout_rate=0.0,
                                seed=3, prefix=prefix, progress=lambda line: None)
        assert report.ok, "\n".join(report.lines())
        store = demo_store(redis, prefix)
        await redis.xadd(store.keyspace.dead_letters(0), {
            "handler": "payment-service", "s": "order-<b>x</b>", "v": "1", "log_id": "1-0",
            "error_type": "ValueError", "error": "card <script>alert(1)</script> declined",
            "traceback": "Traceback ...", "attempts": "5", "deliveries": "5",
            "failed_at_ms": str(int(time.time() * 1000)), "t": "x", "d": "",
        })
        completed = [o.id for o in report.outcomes if o.kind == "trip" and o.actual == "completed"]
        # No payment service: the order waits (on a manual clock at the real time).
        driver = Driver(store, [DemoOrders()], clock=ManualClock(int(time.time() * 1000)))
        await store.append("order-w1", [OrderPlaced("w1", 100)])
        await driver.run_until_idle()
        order = f"{DemoOrders.name}-w1"
        correlation = (await store.read(order)).events[0].correlation_id
        return Prepared(f"{DemoTravel.name}-{completed[0]}", order, correlation)
    finally:
        await redis.aclose()


@pytest.fixture
def console(real_redis_url: str, prefix: str, tmp_path: Path) -> Iterator[str]:
    """`rsaga web` as a real OS process, with a token; its base URL."""
    port = free_port()
    env = {
        **os.environ, "RSAGA_REDIS_URL": real_redis_url, "RSAGA_PREFIX": prefix,
        "RSAGA_WEB_TOKEN": TOKEN, "RSAGA_WEB_PORT": str(port),
    }
    rsaga = Path(sys.executable).with_name("rsaga")
    server = subprocess.Popen([str(rsaga), "web"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    output = server.stdout.read().decode() if server.stdout else ""
                    pytest.fail(f"rsaga web did not start: {output}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def test_an_operator_finds_a_process_reads_it_and_acts_on_it(
    console: str, real_redis_url: str, prefix: str, tmp_path: Path
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    expect = playwright_api.expect
    chromium = _chromium()
    prepared = anyio.run(_prepare, real_redis_url, prefix)
    shots = DOCS if os.environ.get("RSAGA_UPDATE_SCREENSHOTS") == "1" else tmp_path
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))

        page.goto(console + "/")
        types = page.locator("#process-types")
        expect(types).to_contain_text("travel-booking")
        expect(types).to_contain_text("order-fulfilment")
        page.screenshot(path=str(shots / "console-overview.png"), full_page=True)

        # A saga, found by type, state and process id prefix.
        page.get_by_role("link", name="Processes").click()
        page.select_option("select[name=type]", "travel-booking")
        page.select_option("select[name=state]", "completed")
        page.fill("input[name=prefix]", prepared.trip.removeprefix(f"{DemoTravel.name}-")[:-1])
        page.get_by_role("button", name="Find").click()
        expect(page.locator("#process-list")).to_be_visible()
        page.get_by_role("link", name=prepared.trip).click()
        expect(page.locator("#process-status")).to_have_text("completed")
        expect(page.locator("#saga-steps li.step-done")).to_have_count(3)
        expect(page.locator("#timeline")).to_contain_text("rsaga.saga.Completed")
        page.screenshot(path=str(shots / "console-process.png"), full_page=True)

        # An order, found by its correlation id, read, then terminated with the token.
        page.get_by_role("link", name="Processes").click()
        page.select_option("select[name=state]", "any")
        page.fill("input[name=correlation]", prepared.correlation)
        page.get_by_role("button", name="Find").click()
        expect(page.locator("#process-list tbody tr")).to_have_count(1)
        page.get_by_role("link", name=prepared.order).click()
        expect(page.locator("#process-status")).to_have_text("active")
        expect(page.locator("#process-state")).to_contain_text("PaymentPending")
        expect(page.locator("#timeline")).to_contain_text("rsaga.ProcessStarted")
        assert page.locator("#process-actions").count() == 0  # not signed in
        page.fill("input[name=token]", TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.fill("#process-actions input[name=reason]", "customer cancelled by phone")
        page.get_by_role("button", name="Terminate").click()
        expect(page.locator(".flash")).to_contain_text("terminated")
        expect(page.locator("#process-status")).to_have_text("failed")
        expect(page.locator("#timeline")).to_contain_text("rsaga.ProcessTerminated")
        assert page.locator("#process-actions").count() == 0  # it ended: nothing to act on

        # Dead letters: drop one after confirming; without the session the endpoint refuses.
        page.get_by_role("link", name="Dead letters").click()
        table = page.locator("#dead-letters")
        expect(table).to_contain_text("card <script>alert(1)</script> declined")
        page.get_by_role("button", name="Drop").click()
        expect(page.locator(".flash")).to_contain_text("dropped")
        assert dialogs == ["Terminate this process?", "Drop this dead letter for good?"]
        expect(page.get_by_text("No dead letters.")).to_be_visible()
        page.get_by_role("link", name="sign out").click()
        refused = page.evaluate(
            "async () => (await fetch('/dead-letters/0/1-0/drop', {method: 'POST'})).status"
        )
        assert refused == 403

        time.sleep(3)  # one live refresh of the page must not break it
        expect(page.get_by_text("No dead letters.")).to_be_visible()
        assert errors == []
        browser.close()
