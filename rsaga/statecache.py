"""The executor's state cache: folded states kept between executions, per fold.

A command (or process step) that ran leaves behind the state its streams folded
to, at the versions it read. The next execution of the same fold starts from
that state: it folds only the events after those versions, or, when it decides
on the cached state without reading at all, relies on the commit's
expected-version check. A stale entry is therefore safe: the commit conflicts,
and the retry reads only what changed since the versions the entry holds.
"""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import msgspec

from rsaga.defaults import DEFAULT_STATE_CACHE_SIZE as DEFAULT_STATE_CACHE_SIZE


class CachedFold(msgspec.Struct):
    """A folded state, the version of each stream it folded, and the keys it saw."""

    versions: dict[str, int]
    """Each stream read, in read order, at the version folded."""
    state: Any
    """Never handed out: users of the entry work on copies (see `copy`)."""
    keys: set[str]
    """Idempotency keys of the folded events (duplicates are found without re-reading)."""
    snapshot: int = 0
    """Version of the fold's latest snapshot in Redis, as far as known (0: none)."""


def clone(state: Any) -> Any:
    """A deep copy of `state`: pickled when it can be (fast), else `copy.deepcopy`."""
    try:
        return pickle.loads(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    except (pickle.PicklingError, TypeError, AttributeError):
        return copy.deepcopy(state)


class StateCache:
    """A least-recently-used map of fold key -> `CachedFold`, of at most `size` entries."""

    def __init__(self, size: int = DEFAULT_STATE_CACHE_SIZE) -> None:
        if size < 1:
            raise ValueError(f"state cache size must be >= 1, got {size}")
        self.size = size
        self.generation = 0
        """Raised by `clear`: a fold begun before it must not be kept."""
        self._entries: OrderedDict[Hashable, CachedFold] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def copy(self, key: Hashable) -> CachedFold | None:
        """A copy of the entry of `key` for the caller to fold on (the entry stays)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return CachedFold(dict(entry.versions), clone(entry.state), set(entry.keys), entry.snapshot)

    def put(self, key: Hashable, entry: CachedFold, *, replace: bool = False) -> None:
        """Keep `entry`, unless an entry at least as recent in every stream is there
        (`replace`: keep it anyway, as a fold that found its streams shorter does)."""
        current = self._entries.get(key)
        if not replace and current is not None and any(
            entry.versions.get(s, -1) < v for s, v in current.versions.items()
        ):
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def discard(self, key: Hashable) -> None:
        """Forget `key`."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything, and what folds begun before now would keep."""
        self._entries.clear()
        self.generation += 1
