"""Retry policies: exact delays, limits, jitter and decoding (pure, no Redis)."""

from __future__ import annotations

import random

import msgspec
import pytest

from rsaga import ExponentialBackoff, FixedDelay, LinearBackoff, RetryPolicy, ValidationError
from rsaga.retry import BuiltinRetryPolicy


def delays(policy: RetryPolicy, n: int) -> list[float | None]:
    return [policy.delay(retry) for retry in range(1, n + 1)]


def test_fixed_delay() -> None:
    policy = FixedDelay(interval=0.25, max_retries=3)
    assert delays(policy, 5) == [0.25, 0.25, 0.25, None, None]


def test_fixed_delay_of_zero_still_counts_retries() -> None:
    assert delays(FixedDelay(interval=0, max_retries=2), 3) == [0.0, 0.0, None]


def test_exponential_backoff_grows_then_caps() -> None:
    policy = ExponentialBackoff(base=0.1, cap=1.0, multiplier=2.0, max_retries=7)
    assert delays(policy, 8) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, None])
    assert delays(policy, 8)[-1] is None


def test_exponential_backoff_multiplier() -> None:
    policy = ExponentialBackoff(base=0.01, cap=100.0, multiplier=3.0, max_retries=4)
    assert delays(policy, 4) == pytest.approx([0.01, 0.03, 0.09, 0.27])


def test_exponential_backoff_multiplier_one_is_constant() -> None:
    policy = ExponentialBackoff(base=0.5, cap=100.0, multiplier=1.0, max_retries=3)
    assert delays(policy, 4) == [0.5, 0.5, 0.5, None]


def test_exponential_backoff_late_retries_stay_capped() -> None:
    policy = ExponentialBackoff(base=0.01, cap=2.0, max_retries=10_000)
    assert policy.delay(10_000) == 2.0


def test_exponential_backoff_cap_bounds_any_multiplier() -> None:
    policy = ExponentialBackoff(base=0.01, cap=2.0, multiplier=1e6, max_retries=100)
    assert policy.delay(100) == 2.0


def test_linear_backoff() -> None:
    policy = LinearBackoff(initial=0.5, increment=0.25, max_retries=4)
    assert delays(policy, 6) == [0.5, 0.75, 1.0, 1.25, None, None]


def test_max_retries_zero_never_retries() -> None:
    for policy in (
        FixedDelay(max_retries=0),
        ExponentialBackoff(max_retries=0),
        LinearBackoff(max_retries=0),
    ):
        assert policy.delay(1) is None


def test_defaults() -> None:
    assert delays(FixedDelay(), 6) == [0.1] * 5 + [None]
    assert delays(LinearBackoff(), 2) == pytest.approx([0.1, 0.2])
    assert ExponentialBackoff().delay(1) == 0.01


def test_retry_numbers_start_at_one() -> None:
    with pytest.raises(ValidationError, match="start at 1"):
        FixedDelay().delay(0)


@pytest.mark.parametrize(
    "policy",
    [
        FixedDelay(interval=1.0, jitter=0.5, max_retries=50),
        ExponentialBackoff(base=0.5, cap=4.0, jitter=1.0, max_retries=50),
        LinearBackoff(initial=1.0, increment=0.5, jitter=0.25, max_retries=50),
    ],
)
def test_jitter_shaves_within_bounds_and_is_reproducible(policy: RetryPolicy) -> None:
    rng = random.Random(1234)
    jittered = [policy.delay(r, rng) for r in range(1, 51)]
    rng = random.Random(1234)
    assert [policy.delay(r, rng) for r in range(1, 51)] == jittered, "seeded: reproducible"
    replay = random.Random(1234)
    for retry, value in enumerate(jittered, start=1):
        base = policy.base_delay(retry)
        assert value is not None
        assert base * (1 - policy.jitter) <= value <= base
        assert value == pytest.approx(base * (1 - policy.jitter * replay.random()))
    # Jitter actually varies the delays (the seeded values are not all the same fraction).
    assert len({round(v / policy.base_delay(r), 9) for r, v in enumerate(jittered, 1)}) > 10


def test_jitter_with_a_seeded_rng_gives_pinned_delays() -> None:
    # random.Random(0).random() draws 0.8444..., 0.7579..., 0.4205...
    assert FixedDelay(interval=1.0, jitter=0.5).delay(1, random.Random(0)) == pytest.approx(
        1.0 - 0.5 * 0.8444218515250481
    )
    rng = random.Random(0)
    policy = ExponentialBackoff(base=0.1, cap=1.0, jitter=1.0)
    assert [policy.delay(n, rng) for n in (1, 2, 3)] == pytest.approx(
        [0.015557814847495188, 0.04840911941193951, 0.23177136766766201]
    )


def test_jitter_without_rng_uses_the_module_random() -> None:
    policy = FixedDelay(interval=1.0, jitter=1.0)
    random.seed(7)
    first = policy.delay(1)
    random.seed(7)
    assert policy.delay(1) == first
    assert first is not None
    assert 0.0 <= first <= 1.0


def test_no_jitter_ignores_rng() -> None:
    rng = random.Random(1)
    assert FixedDelay(interval=0.3).delay(1, rng) == 0.3
    assert rng.random() == random.Random(1).random(), "no jitter must not draw a number"


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: FixedDelay(interval=-0.1), "interval"),
        (lambda: FixedDelay(max_retries=-1), "max_retries"),
        (lambda: FixedDelay(jitter=-0.1), "jitter"),
        (lambda: FixedDelay(jitter=1.5), "jitter"),
        (lambda: ExponentialBackoff(base=-1.0), "base"),
        (lambda: ExponentialBackoff(cap=-1.0), "cap"),
        (lambda: ExponentialBackoff(multiplier=0.5), "multiplier"),
        (lambda: LinearBackoff(initial=-1.0), "initial"),
        (lambda: LinearBackoff(increment=-0.5), "increment"),
    ],
)
def test_invalid_values_are_refused(make: object, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        make()  # type: ignore[operator]


def test_policies_decode_from_a_dict_by_kind() -> None:
    fixed = msgspec.convert(
        {"kind": "fixed", "interval": 0, "max_retries": 2}, BuiltinRetryPolicy
    )
    assert fixed == FixedDelay(interval=0.0, max_retries=2)
    exp = msgspec.convert(
        {"kind": "exponential", "base": 0.01, "cap": 1.0, "max_retries": 5}, BuiltinRetryPolicy
    )
    assert exp == ExponentialBackoff(base=0.01, cap=1.0, max_retries=5)
    linear = msgspec.convert(
        {"kind": "linear", "initial": 1, "increment": 2}, BuiltinRetryPolicy
    )
    assert isinstance(linear, LinearBackoff)
    assert delays(linear, 3) == [1.0, 3.0, 5.0]


def test_policies_round_trip_through_their_encoding() -> None:
    policy = ExponentialBackoff(base=0.5, cap=3.0, multiplier=1.5, max_retries=9, jitter=0.2)
    encoded = msgspec.to_builtins(policy)
    assert encoded["kind"] == "exponential"
    assert msgspec.convert(encoded, BuiltinRetryPolicy) == policy


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kind": "nope"}, "Invalid value 'nope'"),
        ({"interval": 1}, "kind"),
        ({"kind": "fixed", "interval": -1}, "interval: must be >= 0"),
        ({"kind": "linear", "jitter": 2}, "jitter"),
        ({"kind": "fixed", "interval": "soon"}, "Expected `float"),
    ],
)
def test_bad_policy_dicts_fail_to_decode(raw: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(raw, BuiltinRetryPolicy)
