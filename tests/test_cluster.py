"""rsaga on a real local Redis Cluster: connecting, the stored shard count, scripts after a
flush, real `rsaga worker` processes over 8 shards on 3 masters, a slot moving under
running workers, and a master killed mid-run (failover, with and without replicated
durability).

The store, worker, process and saga suites run on the cluster too, through the
`redis` fixture's "cluster" backend (see conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from bank import BANK_EVENTS, Deposited
from conftest import CLUSTER_SHARDS, cluster_client
from redis.asyncio import Redis
from rsaga_examples.orders import OrderPlaced
from test_worker_processes import (
    ROOT,
    WorkerProcess,
    all_seen,
    assert_exactly_once,
    wait_for,
    workers,  # noqa: F401 (a fixture)
)
from worker_plugins import Ping, Recorder, Seen

from rsaga import EventRegistry, EventStore, Executor, Keyspace
from rsaga.cluster import cluster_layout, ensure_shard_count, parse_shards
from rsaga.deadletters import DeadLetters
from rsaga.errors import ConfigError, NotReplicated
from rsaga.health import live_heartbeats, redis_down
from rsaga.processes import FRAMEWORK_EVENTS
from rsaga.scheduler import Scheduler
from rsaga.testing import RedisClusterNodes, fake_redis
from rsaga.worker import Worker

pytestmark = pytest.mark.cluster


def cluster_store(redis: Redis, prefix: str, **options: object) -> EventStore:
    registry = EventRegistry([Ping, Seen, OrderPlaced, *BANK_EVENTS, *FRAMEWORK_EVENTS])
    keyspace = Keyspace(prefix=prefix, shards=CLUSTER_SHARDS)
    return EventStore(redis, registry, keyspace=keyspace, **options)  # type: ignore[arg-type]


def rsaga(url: str, prefix: str, *args: str, shards: int = CLUSTER_SHARDS) -> tuple[int, str]:
    env = {
        **os.environ, "RSAGA_REDIS_URL": url, "RSAGA_REDIS_CLUSTER": "true",
        "RSAGA_PREFIX": prefix, "RSAGA_SHARDS": str(shards),
    }
    done = subprocess.run(
        [sys.executable, "-m", "rsaga.cli", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )
    return done.returncode, done.stdout + done.stderr


# --- connecting, checking, the shard count ----------------------------------------------


def test_check_prints_every_master_and_the_shards_it_holds(
    redis_cluster: RedisClusterNodes, prefix: str
) -> None:
    code, out = rsaga(redis_cluster.url, prefix, "check")
    assert code == 0, out
    assert "(cluster)" in out
    masters = [line for line in out.splitlines() if line.startswith("master")]
    assert len(masters) == 3, out
    held = sorted(
        shard
        for line in masters
        if not line.endswith("shards none")
        for shard in parse_shards(line.rsplit("shards ", 1)[1], CLUSTER_SHARDS)
    )
    assert held == list(range(CLUSTER_SHARDS)), out
    assert "warning" not in out
    for command in (["health"], ["process", "list"], ["dlq", "list"]):
        code, out = rsaga(redis_cluster.url, prefix, *command)
        assert code in (0, 1), out  # 1: no worker is alive, a warning
        assert "rsaga:" not in out, out


def test_one_shard_on_a_cluster_works_but_warns(
    redis_cluster: RedisClusterNodes, prefix: str
) -> None:
    code, out = rsaga(redis_cluster.url, prefix, "check", shards=1)
    assert code == 0, out
    assert "warning    store.shards is 1 on a Redis Cluster" in out


def test_a_shard_count_that_disagrees_with_redis_refuses_to_start(
    redis_cluster: RedisClusterNodes, prefix: str
) -> None:
    assert rsaga(redis_cluster.url, prefix, "check")[0] == 0
    for command in (["check"], ["worker"], ["scheduler"]):
        code, out = rsaga(redis_cluster.url, prefix, *command, shards=4)
        assert code == 2, out
        assert f"store.shards is 4 but the keyspace '{prefix}' in Redis has 8 shards" in out
        assert "Traceback" not in out


async def test_the_first_commit_stores_the_shard_count_and_a_store_that_disagrees_refuses(
    prefix: str,
) -> None:
    redis = fake_redis()
    store = cluster_store(redis, prefix)
    await store.append("acct-1", [Deposited(1)])
    assert await redis.get(store.keyspace.shard_count()) == b"8"
    other = EventStore(redis, store.registry, keyspace=Keyspace(prefix=prefix, shards=2))
    with pytest.raises(ConfigError, match="a migration, not a setting"):
        await other.append("acct-1", [Deposited(2)])
    assert (await store.read("acct-1")).version == 1, "the refused commit wrote nothing"
    await ensure_shard_count(redis, store.keyspace)  # agreeing is fine


def test_a_worker_serves_only_the_shards_it_is_given(
    redis_cluster: RedisClusterNodes, prefix: str
) -> None:
    code, out = rsaga(redis_cluster.url, prefix, "worker", "--shards", "2-9")
    assert code == 2, out
    assert "--shards: '2-9' is outside 0-7" in out
    assert parse_shards("0-2,5,7", 8) == [0, 1, 2, 5, 7]


async def test_scripts_reload_after_a_flush_on_every_master(
    redis_cluster: RedisClusterNodes, prefix: str
) -> None:
    redis = cluster_client(redis_cluster.url)
    store = cluster_store(redis, prefix)
    ids = [f"acct-{n}" for n in range(16)]
    for stream_id in ids:
        await store.append(stream_id, [Deposited(1)])
    await redis.script_flush()  # every master forgets every script, as after a failover
    for stream_id in ids:
        await store.append(stream_id, [Deposited(2)], expected=1)
    assert {s.version for s in (await store.read_streams(ids)).values()} == {2}
    await redis.aclose()


async def test_replicated_durability_without_replicas_is_a_clear_error(
    redis_cluster: RedisClusterNodes, prefix: str
) -> None:
    redis = cluster_client(redis_cluster.url)
    store = cluster_store(redis, prefix, durability="replicated", replication_timeout=0.05)
    with pytest.raises(NotReplicated, match=r"0 of 1 replicas acknowledged it within 0\.05 s"):
        await store.append("acct-1", [Deposited(1)])
    await redis.aclose()


# --- real workers over 8 shards on 3 masters -------------------------------------------


def recorders(url: str, prefix: str, tmp_path: Path, **env: str) -> list[WorkerProcess]:
    """Two `rsaga worker` processes running `Recorder` on the cluster at `url`, 8 shards."""
    env = {"RSAGA_REDIS_CLUSTER": "true", "RSAGA_SHARDS": str(CLUSTER_SHARDS), **env}
    return [WorkerProcess(url, prefix, tmp_path, "Recorder", **env) for _ in range(2)]


async def append_rounds(store: EventStore, ids: list[str], rounds: range) -> None:
    for round_ in rounds:
        async with anyio.create_task_group() as tg:
            for stream_id in ids:
                tg.start_soon(store.append, stream_id, [Ping(n=round_)])


@pytest.mark.parametrize("disruption", ["a worker killed", "a slot moved"])
async def test_two_workers_keep_per_stream_order_through(
    disruption: str, redis_cluster: RedisClusterNodes, prefix: str, tmp_path: Path,
    workers: list[WorkerProcess],  # noqa: F811
) -> None:
    """Per-stream order and effects once, over 8 shards on 3 masters, while a worker is
    killed (its entries are taken over) or a shard's slot moves (ASK, then MOVED)."""
    redis = cluster_client(redis_cluster.url)
    store = cluster_store(redis, prefix)
    workers += recorders(redis_cluster.url, prefix, tmp_path)
    ids = [f"order-{n}" for n in range(80)]
    await append_rounds(store, ids, range(10))
    shard = store.keyspace.shard_of(ids[0])
    moved_to = None
    if disruption == "a worker killed":
        workers[0].process.send_signal(signal.SIGKILL)
    else:
        moved_to = await move_slot(redis_cluster, redis, store.keyspace.log(shard))
    await append_rounds(store, ids, range(10, 20))
    await wait_for(lambda: all_seen(store, ids, 20), 120, "every event to be handled")
    await assert_exactly_once(store, ids, 20)
    assert await DeadLetters(redis, store.keyspace).count() == 0
    for worker in workers[1:] if moved_to is None else workers:
        assert worker.process.poll() is None, worker.output
    if moved_to is not None:
        layout = await cluster_layout(redis, store.keyspace)
        assert shard in next(m.shards for m in layout if m.name.endswith(f":{moved_to}"))
    await redis.aclose()


async def move_slot(cluster: RedisClusterNodes, redis: Redis, key: str) -> int:
    """Move the slot of `key` to another master with MIGRATING/IMPORTING and MIGRATE, key
    by key, while clients keep writing (they meet ASK, then MOVED); the new master's port."""
    slot = int(cluster.redis_cli("cluster", "keyslot", key))
    source = redis.get_node_from_key(key).port  # type: ignore[attr-defined]
    target = next(p for p in cluster.master_ports() if p != source)
    source_id = cluster.redis_cli("cluster", "myid", port=source).strip()
    target_id = cluster.redis_cli("cluster", "myid", port=target).strip()
    cluster.redis_cli("cluster", "setslot", str(slot), "importing", source_id, port=target)
    cluster.redis_cli("cluster", "setslot", str(slot), "migrating", target_id, port=source)
    while True:
        keys = cluster.redis_cli(
            "cluster", "getkeysinslot", str(slot), "10", port=source
        ).split()
        if not keys:
            break
        for one in keys:
            cluster.redis_cli(
                "migrate", "127.0.0.1", str(target), one, "0", "5000", port=source
            )
        await anyio.sleep(0.05)  # let the writers meet the half-moved slot
    for port in cluster.master_ports():
        cluster.redis_cli("cluster", "setslot", str(slot), "node", target_id, port=port)
    return target


# --- failover ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_master_killed_mid_run_loses_no_replicated_commit(
    prefix: str, tmp_path: Path, workers: list[WorkerProcess],  # noqa: F811
    record_property: pytest.RecordProperty,
) -> None:
    if not RedisClusterNodes.available():
        pytest.skip("redis-server and redis-cli are not on PATH")
    with RedisClusterNodes(masters=3, replicas_per_master=1) as cluster:
        redis = cluster_client(cluster.url)
        replicated = cluster_store(
            redis, prefix, durability="replicated", replication_timeout=0.5
        )
        default = cluster_store(redis, prefix)
        durable = {
            "RSAGA_DURABILITY": "replicated", "RSAGA_STORE_REPLICATION_TIMEOUT": "0.5",
        }
        workers += recorders(cluster.url, prefix, tmp_path, **durable)
        # Order fulfilment processes (with their services and timeouts) run beside.
        env = {"RSAGA_REDIS_CLUSTER": "true", "RSAGA_SHARDS": str(CLUSTER_SHARDS), **durable}
        handlers = [
            arg for name in ORDER_HANDLERS for arg in ("--handler", name)
        ]
        workers += [
            WorkerProcess(cluster.url, prefix, tmp_path, "", ["worker", *handlers], **env),
            WorkerProcess(cluster.url, prefix, tmp_path, "", ["scheduler"], **env),
        ]
        layout = await cluster_layout(redis, replicated.keyspace)
        busiest = max(layout, key=lambda m: len(m.shards))

        async def workers_up() -> bool:
            return len(await live_heartbeats(redis, replicated.keyspace)) == len(workers)

        await wait_for(workers_up, 60, "the workers to start")

        async def place_orders(first: int, count: int) -> None:
            for n in range(first, first + count):
                while True:
                    try:
                        await replicated.append(f"order-{n}", [OrderPlaced(str(n), 10)])
                        break
                    except Exception as exc:
                        if not redis_down(exc):
                            raise
                        await anyio.sleep(0.1)
        acked: dict[str, list[str]] = {}  # stream -> ids of the events acknowledged
        unknown = 0

        async def client(store: EventStore, ids: list[str], rounds: int) -> None:
            nonlocal unknown
            for _ in range(rounds):
                for stream_id in ids:
                    try:
                        result = await store.append(stream_id, [Ping()])
                    except Exception as exc:
                        if not redis_down(exc):
                            raise
                        unknown += 1  # it may or may not have been applied: not counted
                        await anyio.sleep(0.05)
                        continue
                    acked.setdefault(stream_id, []).extend(e.event_id for e in result.events)

        r_ids = [f"r-{n}" for n in range(24)]
        a_ids = [f"a-{n}" for n in range(24)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(client, replicated, r_ids, 20)
            tg.start_soon(client, default, a_ids, 20)
            await place_orders(0, 20)
            await wait_for(lambda: _acked_at_least(acked, 300), 60, "the first commits")
            killed = int(busiest.name.rsplit(":", 1)[1])
            cluster.kill(killed)
            await anyio.to_thread.run_sync(cluster.wait_ok, 30)
            # The promoted replica has no replica of its own: "replicated" commits to
            # its shards fail (NotReplicated) until the old master rejoins as its replica.
            cluster.restart(killed)
            await anyio.to_thread.run_sync(cluster.wait_ok, 30)
            await place_orders(20, 20)

        lost = {"replicated": 0, "async": 0}
        slices = await replicated.read_streams([*r_ids, *a_ids])
        for stream_id, event_ids in acked.items():
            stored = {e.event_id for e in slices[stream_id].events}
            kind = "replicated" if stream_id.startswith("r-") else "async"
            lost[kind] += sum(1 for event_id in event_ids if event_id not in stored)
        record_property("acknowledged_commits", sum(len(v) for v in acked.values()))
        record_property("lost_async_commits", lost["async"])
        record_property("unknown_outcomes", unknown)
        total = {
            kind: sum(len(v) for s, v in acked.items() if (s[0] == "r") == (kind == "replicated"))
            for kind in lost
        }
        print(f"failover: acknowledged {total}, lost {lost}, unknown outcomes {unknown}")
        assert lost["replicated"] == 0, lost

        # The workers handle every event that survived, in order, once. (A lost
        # "async" event may have been handled before it was lost: there the record
        # can run ahead of the stream, which is what losing an acknowledged write means.)
        ids = [*r_ids, *a_ids]
        final = {s: v.version for s, v in (await replicated.read_streams(ids)).items()}

        async def all_recorded() -> bool:
            seen = await replicated.read_streams([f"seen-{s}" for s in ids])
            return all(seen[f"seen-{s}"].version >= final[s] for s in ids)

        await wait_for(all_recorded, 120, "the workers to handle every stored event")
        for stream_id in r_ids:
            seen = (await replicated.read(f"seen-{stream_id}")).events
            assert [e.data.version for e in seen] == list(range(1, final[stream_id] + 1))
        async def orders_done() -> bool:
            async with redis.pipeline(transaction=False) as pipe:
                for shard in range(CLUSTER_SHARDS):
                    key = replicated.keyspace.process_stats(shard, "order-fulfilment")
                    pipe.hmget(key, ["completed", "failed"])
                counts = await pipe.execute()
            assert not sum(int(failed or 0) for _, failed in counts), "an order failed"
            return sum(int(done or 0) for done, _ in counts) == 40

        await wait_for(orders_done, 120, "every order process to complete")
        for worker in workers:
            assert worker.process.poll() is None, worker.output
        await redis.aclose()


ORDER_HANDLERS = ("order-fulfilment", "payment-service", "inventory-service", "shipping-service")
"""The example's order fulfilment process and the services it talks to (entry points)."""


async def _acked_at_least(acked: dict[str, list[str]], n: int) -> bool:
    return sum(len(v) for v in acked.values()) >= n


async def test_dead_letters_of_every_shard_are_dropped_on_a_cluster(
    redis_cluster: RedisClusterNodes, prefix: str
) -> None:
    redis = cluster_client(redis_cluster.url)
    keyspace = Keyspace(prefix=prefix, shards=CLUSTER_SHARDS)
    for shard in range(CLUSTER_SHARDS):
        await redis.xadd(keyspace.dead_letters(shard), {"e": "x"})
    assert await DeadLetters(redis, keyspace).drop_all() == CLUSTER_SHARDS
    assert await redis.exists(*(keyspace.dead_letters(n) for n in range(CLUSTER_SHARDS))) == 0
    await redis.aclose()


async def test_stream_reads_are_routed_without_asking_a_node_for_their_keys(
    redis_cluster: RedisClusterNodes, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = cluster_client(redis_cluster.url)
    log = Keyspace(prefix=prefix, shards=CLUSTER_SHARDS).log(5)
    await redis.xadd(log, {"f": "1"})
    await redis.xgroup_create(log, "g", "0")

    async def no_round_trip(*args: object) -> None:
        raise AssertionError(f"COMMAND GETKEYS for {args}")

    monkeypatch.setattr(redis.commands_parser, "get_keys", no_round_trip)  # type: ignore[attr-defined]
    assert await redis.xread({log: "0"}, count=1)
    assert await redis.xreadgroup("g", "c", {log: ">"}, count=1)
    await redis.aclose()


def test_workers_and_schedulers_serve_the_shards_they_are_given(prefix: str) -> None:
    store = cluster_store(fake_redis(), prefix)
    every = Worker(Executor(store), [Recorder()])
    assert {sub.consumer.shard for sub in every.subscriptions} == set(range(CLUSTER_SHARDS))
    some = Worker(Executor(store), [Recorder()], shards=parse_shards("2-4", CLUSTER_SHARDS))
    assert {sub.consumer.shard for sub in some.subscriptions} == {2, 3, 4}
    assert Scheduler(store.redis, store.keyspace, shards=[0, 7]).shards == [0, 7]
    assert Scheduler(store.redis, store.keyspace).shards == list(range(CLUSTER_SHARDS))
