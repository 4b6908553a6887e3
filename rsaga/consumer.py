"""Alias module: the code lives in `rsaga.runtime.consumer`."""

from rsaga.runtime.consumer import (
    START_FROM_BEGINNING,
    START_FROM_NEW,
    GroupConsumer,
    RawEntry,
    ReadResult,
)

__all__ = [
    "START_FROM_BEGINNING",
    "START_FROM_NEW",
    "GroupConsumer",
    "RawEntry",
    "ReadResult",
]
