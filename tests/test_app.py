"""`rsaga.open_store`: the store an app needs, from the settings its workers use."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from redis.asyncio import Redis
from rsaga_examples.orders import (
    WORLD_EVENTS,
    InventoryService,
    OrderFulfilment,
    OrderPlaced,
    PaymentService,
    ShippingService,
)

from rsaga import EventStore, EventTooLarge, Keyspace, open_store
from rsaga.config import Settings, StoreSettings, WorkerSettings, load_settings
from rsaga.errors import ConfigError
from rsaga.events import EventRegistry
from rsaga.inspect import show_process
from rsaga.testing import Driver

EXAMPLES = [f"rsaga_examples.orders:{name}" for name in (
    "OrderFulfilment", "PaymentService", "InventoryService", "ShippingService"
)]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in list(os.environ):
        if var.startswith("RSAGA_") and var != "RSAGA_REQUIRE_REDIS":
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)


def test_every_store_setting_is_applied(clean_env: None) -> None:
    settings = Settings(
        store=StoreSettings(prefix="app", shards=3, max_event_bytes=300, read_page_size=7)
    )
    store = open_store(settings, events=WORLD_EVENTS, allow_embedded=True)
    assert (store.keyspace.prefix, store.keyspace.shards) == ("app", 3)
    assert store.codec.max_event_bytes == 300
    assert store.page_size == 7
    assert {"orders.OrderPlaced", "rsaga.ProcessStarted", "rsaga.saga.Compensated"} <= set(
        store.registry.names()
    )


async def test_a_big_event_is_refused_by_the_configured_limit(clean_env: None) -> None:
    store = open_store(
        Settings(store=StoreSettings(max_event_bytes=300)), events=WORLD_EVENTS,
        allow_embedded=True,
    )
    with pytest.raises(EventTooLarge):
        await store.append("order-1", [OrderPlaced("1", 10, payment="x" * 400)])
    await store.redis.aclose()


def test_settings_default_to_the_environment_the_workers_read(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RSAGA_PREFIX", "from-env")
    monkeypatch.setenv("RSAGA_SHARDS", "4")
    store = open_store(allow_embedded=True)
    assert (store.keyspace.prefix, store.keyspace.shards) == ("from-env", 4)


def test_without_a_redis_url_it_is_a_config_error_unless_embedded_is_allowed(
    clean_env: None,
) -> None:
    with pytest.raises(ConfigError, match="RSAGA_REDIS_URL"):
        open_store(Settings())
    assert isinstance(open_store(Settings(), allow_embedded=True), EventStore)


async def test_app_code_reads_any_process_stream_with_nothing_registered_by_hand(
    clean_env: None, real_redis_url: str, prefix: str
) -> None:
    keyspace = Keyspace(prefix=prefix, shards=3)
    redis = Redis.from_url(real_redis_url)
    workers = Driver(
        EventStore(redis, EventRegistry(WORLD_EVENTS), keyspace=keyspace),
        [OrderFulfilment(), PaymentService(), InventoryService(), ShippingService()],
    )
    await workers.store.append("order-9", [OrderPlaced("9", 10)])
    await workers.run_until_idle()
    await redis.aclose()

    settings = Settings(
        redis=load_settings(environ={"RSAGA_REDIS_URL": real_redis_url}).redis,
        store=StoreSettings(prefix=prefix, shards=3),
        worker=WorkerSettings(handlers=EXAMPLES),
    )
    store = open_store(settings)
    try:
        events = (await store.read("order-fulfilment-9")).events
        assert len(events) > 3
        assert {"rsaga.ProcessStarted", "orders.OrderAccepted"} <= {e.type for e in events}
        view = await show_process(store, "order-fulfilment-9")
        assert view is not None
        assert view.status != "unknown"
        payments = (await store.read("payment-9")).events
        assert payments[0].type == "orders.PaymentRequested"
    finally:
        await store.redis.aclose()


def test_recorded_event_data_has_the_users_type_under_mypy(tmp_path: Path) -> None:
    from mypy import api

    sample = tmp_path / "sample.py"
    sample.write_text(textwrap.dedent("""
        import msgspec
        from rsaga import RecordedEvent

        class Deposited(msgspec.Struct, frozen=True):
            amount: int

        def amount(event: RecordedEvent[Deposited]) -> int:
            reveal_type(event.data)
            return event.data.amount

        def anything(event: RecordedEvent) -> None:
            reveal_type(event.data)

        def wrong(event: RecordedEvent[Deposited]) -> str:
            return event.data.amount
    """))
    out, _, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", os.devnull, str(sample)]
    )
    assert 'Revealed type is "sample.Deposited"' in out
    assert 'Revealed type is "Any"' in out
    assert 'Incompatible return value type (got "int", expected "str")' in out
    assert status == 1
