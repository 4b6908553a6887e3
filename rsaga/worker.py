"""Alias module: the code lives in `rsaga.runtime.worker`."""

from rsaga.runtime.liveness import consumer_name
from rsaga.runtime.sources import TIMEOUTS_GROUP, UNDELIVERABLE, timeouts_group
from rsaga.runtime.worker import Worker

__all__ = [
    "TIMEOUTS_GROUP",
    "UNDELIVERABLE",
    "Worker",
    "consumer_name",
    "timeouts_group",
]
