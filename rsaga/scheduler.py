"""Alias module: the code lives in `rsaga.runtime.scheduler`."""

from rsaga.runtime.scheduler import (
    Scheduler,
    Tick,
)

__all__ = [
    "Scheduler",
    "Tick",
]
