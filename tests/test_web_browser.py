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

import anyio
import pytest
from redis.asyncio import Redis
from rsaga_examples.demo import DemoTravel, demo_store, run_demo

from rsaga.testing import free_port, require_real_redis

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


async def _prepare(url: str, prefix: str) -> str:
    """A finished demo run and one dead letter; the stream id of a completed trip."""
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
        return f"{DemoTravel.name}-{completed[0]}"
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


def test_an_operator_finds_a_saga_reads_it_and_acts_on_a_dead_letter(
    console: str, real_redis_url: str, prefix: str, tmp_path: Path
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    trip = anyio.run(_prepare, real_redis_url, prefix)
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
        playwright_api.expect(types).to_contain_text("travel-booking")
        playwright_api.expect(types).to_contain_text("order-fulfilment")
        page.screenshot(path=str(shots / "console-overview.png"), full_page=True)

        page.get_by_role("link", name="Processes").click()
        page.select_option("select[name=type]", "travel-booking")
        page.select_option("select[name=state]", "completed")
        page.fill("input[name=prefix]", trip[:-1])
        page.get_by_role("button", name="Find").click()
        playwright_api.expect(page.locator("#process-list")).to_be_visible()
        page.get_by_role("link", name=trip).click()

        playwright_api.expect(page.locator("#process-status")).to_have_text("completed")
        playwright_api.expect(page.locator("#saga-steps li.step-done")).to_have_count(3)
        playwright_api.expect(page.locator("#timeline")).to_contain_text("rsaga.saga.Completed")
        page.screenshot(path=str(shots / "console-process.png"), full_page=True)

        page.get_by_role("link", name="Dead letters").click()
        table = page.locator("#dead-letters")
        playwright_api.expect(table).to_contain_text("card <script>alert(1)</script> declined")
        assert page.get_by_role("button", name="Replay").count() == 0  # not signed in
        refused = page.evaluate(
            "async () => (await fetch(document.querySelector('#dead-letters td').textContent"
            ".trim().replace(/^/, '/dead-letters/').replace(/$/, '/drop'),"
            " {method: 'POST'})).status"
        )
        assert refused == 403

        page.fill("input[name=token]", TOKEN)
        page.get_by_role("button", name="Sign in").click()
        playwright_api.expect(page.get_by_role("button", name="Drop")).to_be_visible()
        page.get_by_role("button", name="Drop").click()
        playwright_api.expect(page.locator(".flash")).to_contain_text("dropped")
        assert dialogs == ["Drop this dead letter for good?"]
        playwright_api.expect(page.get_by_text("No dead letters.")).to_be_visible()

        time.sleep(3)  # one live refresh of the page must not break it
        playwright_api.expect(page.get_by_text("No dead letters.")).to_be_visible()
        assert errors == []
        browser.close()
