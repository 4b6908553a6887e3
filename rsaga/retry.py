"""Retry policies: fixed delay, exponential backoff and linear backoff.

One policy type serves command conflicts, handler failures and process retries.
`RetryPolicy` is a protocol: any object with ``delay(retry)`` and ``max_retries``
will do. The three built-in policies are msgspec structs tagged by ``kind``
(`BuiltinRetryPolicy`), so config files can name them:
``{kind = "exponential", base = 0.01, cap = 1.0, max_retries = 5}``.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import msgspec

from rsaga.errors import ValidationError


class _Policy(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    max_retries: int = 5
    """How many retries follow the first attempt (0: never retry)."""
    jitter: float = 0.0
    """Fraction in [0, 1] of each delay that is randomly shaved off (0: exact delays)."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValidationError(f"max_retries: must be >= 0, got {self.max_retries}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValidationError(f"jitter: must be within [0, 1], got {self.jitter}")

    def base_delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based), without jitter."""
        raise NotImplementedError

    def delay(self, retry: int, rng: random.Random | None = None) -> float | None:
        """Seconds to wait before retry `retry` with jitter, or None once retries are spent."""
        if retry < 1:
            raise ValidationError(f"retry numbers start at 1, got {retry}")
        if retry > self.max_retries:
            return None
        base = self.base_delay(retry)
        if self.jitter:
            base *= 1.0 - self.jitter * (rng or random).random()
        return base


def _non_negative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValidationError(f"{name}: must be >= 0, got {value}")


class FixedDelay(_Policy, frozen=True, tag="fixed"):
    """The same delay before every retry."""

    interval: float = 0.1
    """Seconds before each retry."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative(interval=self.interval)

    def base_delay(self, retry: int) -> float:
        """`interval`, whatever the retry."""
        return self.interval


class ExponentialBackoff(_Policy, frozen=True, tag="exponential"):
    """``base * multiplier ** (retry - 1)``, never more than `cap`."""

    base: float = 0.01
    """Seconds before the first retry."""
    cap: float = 10.0
    """Upper bound on any delay, in seconds."""
    multiplier: float = 2.0
    """Growth factor per retry."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative(base=self.base, cap=self.cap)
        if self.multiplier < 1:
            raise ValidationError(f"multiplier: must be >= 1, got {self.multiplier}")

    def base_delay(self, retry: int) -> float:
        """The exponential delay for `retry`, capped."""
        try:
            delay = self.base * self.multiplier ** (retry - 1)
        except OverflowError:
            return self.cap
        return float(min(self.cap, delay))


class LinearBackoff(_Policy, frozen=True, tag="linear"):
    """``initial + increment * (retry - 1)``."""

    initial: float = 0.1
    """Seconds before the first retry."""
    increment: float = 0.1
    """Seconds added for each further retry."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative(initial=self.initial, increment=self.increment)

    def base_delay(self, retry: int) -> float:
        """The linear delay for `retry`."""
        return self.initial + self.increment * (retry - 1)


@runtime_checkable
class RetryPolicy(Protocol):
    """How long to wait before each retry, and when to stop."""

    @property
    def max_retries(self) -> int:
        """How many retries follow the first attempt (0: never retry)."""
        ...

    def delay(self, retry: int) -> float | None:
        """Seconds to wait before retry `retry` (1-based), or None once retries are spent."""
        ...


BuiltinRetryPolicy = FixedDelay | ExponentialBackoff | LinearBackoff
"""The three built-in policies, a msgspec tagged union on ``kind``: what config files hold."""


def policy_delay(policy: RetryPolicy, rng: random.Random) -> Callable[[int], float | None]:
    """`policy.delay` drawing its jitter from `rng` where the policy takes one."""
    if isinstance(policy, _Policy):
        return functools.partial(policy.delay, rng=rng)
    return policy.delay
