"""Alias module: the code lives in `rsaga.runtime.worker`."""

from rsaga.runtime.liveness import (
    consumer_name,
)
from rsaga.runtime.worker import (
    TIMEOUTS_GROUP,
    UNDELIVERABLE,
    Worker,
    timeouts_group,
)

__all__ = [
    "TIMEOUTS_GROUP",
    "UNDELIVERABLE",
    "Worker",
    "consumer_name",
    "timeouts_group",
]
