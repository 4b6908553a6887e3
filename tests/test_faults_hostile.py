"""Hostile bytes written by hand where rsaga reads: log, due timeouts, event streams.

One real `rsaga worker` runs through every example: each example plants
hypothesis-generated garbage, then a good event behind it. The worker must
dead-letter exactly the garbage that a group of it receives, keep going, and
never log an error (let alone a traceback) that does not name what it is about.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
from fault_kit import RsagaProcess, Workload, connect, make_store, outputs, wait_for
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from worker_plugins import AlarmSet

from rsaga.deadletters import DeadLetters
from rsaga.errors import RsagaError
from rsaga.processes import decode_timeout
from rsaga.store import EventStore
from rsaga.testing import RedisServer
from rsaga.worker import timeouts_group

pytestmark = pytest.mark.slow

WANTED = {"recorder": {"Ping"}, "alarm": {"AlarmSet"}}
"""The log groups of the worker and the event types each receives."""

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=7) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)


def envelope(type_name: str, payload: bytes, at_ms: int) -> bytes:
    return msgspec.msgpack.encode([bytes(16), type_name, at_ms, "c", None, msgspec.Raw(payload)])


envelopes = st.builds(
    envelope,
    st.sampled_from(["Ping", "AlarmSet", "Stranger"]),
    st.just(b"\x80")  # {}: a valid Ping
    | st.integers(1, 5000).map(lambda depth: b"\x91" * depth + b"\x01")
    | values.map(msgspec.msgpack.encode),
    st.integers(-(2**63), 2**63 - 1),
)
"""Envelopes of the right shape with hostile contents: times out of range, payloads
nested deep or of the wrong shape, types the log field does not name."""
garbage = st.binary(max_size=64) | values.map(msgspec.msgpack.encode) | envelopes
log_fields = st.fixed_dictionaries(
    {
        b"t": st.sampled_from([b"Ping", b"AlarmSet"]) | st.binary(max_size=8),
        b"d": envelopes | garbage,
    },
    optional={
        b"s": st.sampled_from([b"h-1", b""]) | st.binary(max_size=12),
        b"v": st.sampled_from([b"1", b"-1", b"99999999999999999999"]) | st.binary(max_size=4),
        b"g": st.sampled_from([b"recorder", b"alarm"]) | st.binary(max_size=8),
        b"x": garbage,
    },
)
due_fields = st.fixed_dictionaries(
    {b"p": garbage},
    optional={b"s": st.binary(max_size=12), b"t": st.binary(max_size=12), b"due": garbage},
)
stream_fields = st.dictionaries(st.sampled_from([b"d", b"x", b"t"]), garbage, min_size=1)


def log_dead_letters(store: EventStore, fields: dict[bytes, bytes]) -> int:
    """How many dead letters a log entry makes: one per group it reaches and cannot decode."""
    letters = 0
    for group, wanted in WANTED.items():
        if fields.get(b"g", group.encode()) != group.encode():
            continue  # a replay meant for another group: acknowledged unread
        if fields[b"t"].decode(errors="replace") not in wanted:
            continue  # a type the group does not want: acknowledged unread
        try:
            decoded = store.decode_log_entry("0-1", fields, wanted)
        except RsagaError:
            letters += 1
            continue
        assume(decoded is None)  # garbage that happens to be a valid event is no test
    return letters


def due_dead_letters(fields: dict[bytes, bytes]) -> int:
    """How many dead letters a due entry makes: timeouts go to one group per process type,
    and entries that name another type (field `t`) or group (`g`) are acknowledged unread;
    a valid payload of another type is ignored, an undecodable one is a dead letter."""
    group = timeouts_group("alarm").encode()
    if fields.get(b"g", group) != group or fields.get(b"t", b"alarm") != b"alarm":
        return 0
    try:
        payload = decode_timeout(fields[b"p"])
    except (msgspec.DecodeError, KeyError):
        return 1
    assume(payload.process_type != "alarm")  # a valid alarm timeout is no garbage
    return 0


def decodes_as_event(store: EventStore, blob: bytes | None) -> bool:
    if blob is None:
        return False
    try:
        store.codec.decode("x", 1, blob)
    except RsagaError:
        return False
    return True


class Cluster:
    def __init__(self, url: str, prefix: str, worker: RsagaProcess) -> None:
        self.url, self.prefix, self.worker = url, prefix, worker
        self.examples = 0
        self.dead_letters = 0
        self.named: list[str] = []
        """Ids and streams that error lines may be about."""


@pytest.fixture
def cluster(redis_server: RedisServer, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    worker = RsagaProcess(redis_server.url, prefix, tmp_path)
    yield Cluster(redis_server.url, prefix, worker)
    worker.kill()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    logs=st.lists(log_fields, max_size=3),
    dues=st.lists(due_fields, max_size=2),
    streams=st.lists(stream_fields, max_size=2),
)
@example(  # the poison entries of issue 11 findings 1 and 2
    logs=[
        {b"t": b"Ping", b"s": b"p", b"v": b"1", b"d": envelope("Ping", b"\x80", 10**15)},
        {b"t": b"Ping", b"s": b"p", b"v": b"2", b"d": envelope("Stranger", b"\x80", 0)},
    ],
    dues=[],
    streams=[],
)
def test_hostile_bytes_are_dead_letters_and_the_worker_goes_on(
    cluster: Cluster,
    logs: list[dict[bytes, bytes]],
    dues: list[dict[bytes, bytes]],
    streams: list[dict[bytes, bytes]],
) -> None:
    anyio.run(plant_and_check, cluster, logs, dues, streams)


async def plant_and_check(
    cluster: Cluster,
    logs: list[dict[bytes, bytes]],
    dues: list[dict[bytes, bytes]],
    streams: list[dict[bytes, bytes]],
) -> None:
    redis = connect(cluster.url)
    store = make_store(redis, cluster.prefix)
    ks = store.keyspace
    cluster.examples += 1
    n = cluster.examples
    # Every assume() comes before anything is planted: a rejected example
    # must leave nothing behind.
    expected = sum(log_dead_letters(store, f) for f in logs) + sum(map(due_dead_letters, dues))
    for fields in streams:
        assume(not decodes_as_event(store, fields.get(b"d")))
    for index, fields in enumerate(streams):
        await redis.xadd(ks.stream(f"alarm-h{n}-{index}"), fields, id="1-0")
        await store.append(f"alarm-set-h{n}-{index}", [AlarmSet(f"h{n}-{index}", 1)])
        cluster.named.append(f"alarm-set-h{n}-{index}")
    expected += len(streams)
    for fields in logs:
        cluster.named.append((await redis.xadd(ks.log(0), fields)).decode())
    for fields in dues:
        cluster.named.append((await redis.xadd(ks.due_timeouts(0), fields)).decode())
    cluster.dead_letters += expected
    good = Workload(store)
    await good.ping([f"good-{n}"])
    dead = DeadLetters(redis, ks)

    async def done() -> bool:
        return await good.all_handled() and await dead.count() >= cluster.dead_letters

    explain = lambda: outputs([cluster.worker])  # noqa: E731
    await wait_for(done, 30, "the good event and the dead letters", explain)
    await anyio.sleep(0.2)  # a dead letter too many would show now
    assert await dead.count() == cluster.dead_letters
    for key in (ks.log(0), ks.due_timeouts(0)):
        for group in await redis.xinfo_groups(key):
            assert group["pending"] == 0, (key, group)
    output = cluster.worker.output
    assert cluster.worker.alive, output
    assert "Traceback" not in output, output
    for line in output.splitlines():
        if re.search(r"level=(error|critical)", line):
            assert any(name in line for name in cluster.named), line
    await redis.aclose()
