"""Defaults shared by the settings (`rsaga.config`) and the classes they configure,
so that the configuration does not import the executor or the store for them."""

from __future__ import annotations

from rsaga.retry import ExponentialBackoff

DEFAULT_COMMAND_RETRY: ExponentialBackoff = ExponentialBackoff(
    base=0.002, cap=0.25, max_retries=25, jitter=1.0
)
"""Conflicts resolve fast under contention: short, fully jittered delays."""

DEFAULT_PAGE_SIZE = 512
"""Events per read of one stream."""

DEFAULT_DEAD_LETTER_MAX_LEN = 100_000
"""Dead letters kept per shard (oldest trimmed first, approximately)."""

DURABILITIES = ("async", "replicated")
"""What `store.durability` may be: acknowledged by the master, or also by replicas (WAIT)."""

DEFAULT_PROCESS_RETENTION = 7 * 86400.0
"""Seconds a finished process is kept before the scheduler removes it."""

DEFAULT_STATE_CACHE_SIZE = 10_000
"""Folded states an executor keeps (see `rsaga.statecache`)."""
