"""Keyspace: key names, hash tags, shard mapping and stream id validation (no Redis)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from rsaga import CrossShardWrite, InvalidStreamId, Keyspace, ValidationError
from rsaga.keyspace import MAX_STREAM_ID_LENGTH, validate_stream_id

# The characters a stream id may carry (mirrors the documented alphabet).
SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@/+=~!$%&()<>,;|^#-"
stream_ids = st.text(alphabet=SAFE, min_size=1, max_size=MAX_STREAM_ID_LENGTH)


def shard_keys(ks: Keyspace, shard: int) -> list[str]:
    return [
        ks.log(shard),
        ks.dead_letters(shard),
        ks.stream_owners(shard, "billing"),
        ks.handoffs(shard, "billing"),
    ]


@pytest.mark.parametrize("shards", [1, 4, 16])
def test_every_shard_key_carries_the_shard_hash_tag(shards: int) -> None:
    ks = Keyspace(prefix="app", shards=shards)
    for stream_id in ["acct-1", "acct-2", "order:42", "x" * 200]:
        shard = ks.shard_of(stream_id)
        key = ks.stream(stream_id)
        assert key == f"app:{{{shard}}}:s:{stream_id}"
        # Exactly one hash tag, and it is the shard: Redis Cluster hashes only it.
        assert re.findall(r"\{[^}]*\}", key) == [f"{{{shard}}}"]
        slots = {key_slot(k.encode()) for k in [key, *shard_keys(ks, shard)]}
        assert len(slots) == 1, "a stream and its shard's keys must share one hash slot"
    for shard in range(shards):
        for key in shard_keys(ks, shard):
            assert key.startswith(f"app:{{{shard}}}:")


def test_keys_outside_shards_have_no_hash_tag() -> None:
    ks = Keyspace(prefix="app", shards=4)
    assert ks.heartbeat("worker-1") == "app:heartbeat:worker-1"
    assert ks.heartbeat_pattern() == "app:heartbeat:*"
    assert "{" not in ks.heartbeat("w")


def test_shard_keys_of_different_purposes_are_distinct() -> None:
    ks = Keyspace(prefix="app", shards=2)
    keys = [ks.stream("log"), ks.stream("dlq"), *shard_keys(ks, 0), *shard_keys(ks, 1)]
    assert len(set(keys)) == len(keys)


def test_shard_of_is_pinned() -> None:
    """Changing the hash would remap every stream of a deployment: pin it."""
    four = Keyspace(shards=4)
    sixteen = Keyspace(shards=16)
    assert [four.shard_of(s) for s in ["acct-1", "acct-2", "a", "b"]] == [1, 3, 3, 1]
    assert [sixteen.shard_of(s) for s in ["acct-1", "acct-2", "a", "b"]] == [5, 15, 3, 9]


@given(stream_id=stream_ids, shards=st.integers(min_value=1, max_value=16384))
def test_shard_of_is_stable_and_in_range(stream_id: str, shards: int) -> None:
    ks = Keyspace(shards=shards)
    shard = ks.shard_of(stream_id)
    assert 0 <= shard < shards
    assert Keyspace(prefix="other", shards=shards).shard_of(stream_id) == shard
    assert ks.stream(stream_id) == f"rsaga:{{{shard}}}:s:{stream_id}"


def test_one_shard_maps_everything_to_zero() -> None:
    ks = Keyspace()
    assert {ks.shard_of(s) for s in ["a", "b", "acct-2", "zzz"]} == {0}
    assert ks.shard_of_all(["a", "b", "acct-2"]) == 0


def test_shard_of_all() -> None:
    ks = Keyspace(shards=4)
    assert ks.shard_of_all(["a", "acct-2"]) == 3  # both map to shard 3
    assert ks.shard_of_all([]) == 0
    with pytest.raises(CrossShardWrite) as caught:
        ks.shard_of_all(["a", "b"])
    assert "a->3" in str(caught.value)
    assert "b->1" in str(caught.value)
    assert isinstance(caught.value, ValidationError)


@pytest.mark.parametrize(
    "prefix", ["", "a:b", "a{b", "a b", "a*", "p" * 51, "ünï", "a\n"]
)
def test_invalid_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValidationError, match="prefix"):
        Keyspace(prefix=prefix)


@pytest.mark.parametrize("shards", [0, -1, 16385, "2", 2.0, None])
def test_invalid_shard_count_is_refused(shards: object) -> None:
    with pytest.raises(ValidationError, match="shards"):
        Keyspace(shards=shards)  # type: ignore[arg-type]


def test_prefix_limits_are_inclusive() -> None:
    assert Keyspace(prefix="p" * 50, shards=16384).stream("a").startswith("p" * 50 + ":{")
    assert Keyspace(prefix="a.b_c-D9").log(0) == "a.b_c-D9:{0}:log"


@pytest.mark.parametrize(
    "stream_id", ["a", "x" * MAX_STREAM_ID_LENGTH, "order-1:line/2@eu", SAFE]
)
def test_valid_stream_ids_pass(stream_id: str) -> None:
    assert validate_stream_id(stream_id) == stream_id


@pytest.mark.parametrize(
    ("stream_id", "message"),
    [
        ("", "empty"),
        ("x" * (MAX_STREAM_ID_LENGTH + 1), "201 characters long; the limit is 200"),
        ("a{b", "'{'"),
        ("a}b", "'}'"),
        ("a b", "' '"),
        ("a*", "'*'"),
        ("a\nb", r"'\\n'"),
        ("a\n", r"'\\n'"),
        ("a?", "'?'"),
        ("a[1]", "'\\['"),
        ("é", "'é'"),
        ("a\tb", r"'\\t'"),
    ],
)
def test_invalid_stream_ids_are_refused_with_the_reason(stream_id: str, message: str) -> None:
    with pytest.raises(InvalidStreamId, match=message):
        validate_stream_id(stream_id)


@pytest.mark.parametrize("stream_id", [None, 42, b"bytes"])
def test_non_string_stream_ids_are_refused(stream_id: object) -> None:
    with pytest.raises(InvalidStreamId, match="must be a str"):
        validate_stream_id(stream_id)


@given(st.text(max_size=250))
def test_validation_accepts_exactly_the_safe_alphabet(text: str) -> None:
    ok = 0 < len(text) <= MAX_STREAM_ID_LENGTH and all(c in SAFE for c in text)
    if ok:
        assert validate_stream_id(text) == text
    else:
        with pytest.raises(InvalidStreamId):
            validate_stream_id(text)
