"""A scheduled timeout as stored in Redis, and the id of a pending timeout."""

from __future__ import annotations

import re

import msgspec

DEADLINE = "rsaga.deadline"
"""Name of the timeout that enforces a process's `deadline`."""


MAX_TIMEOUT_SECONDS = 10 * 366 * 86400.0
"""The longest `Timeout.after` accepted: ten years."""
MAX_DUE_MS = 253402300799999
"""The latest `Timeout.at_ms` accepted: the end of the year 9999."""
TIMEOUT_ID_SEPARATOR = "|"
"""Between the stream id and the name in a timeout id (`timeout_id`); no stream id and
no timeout name contains it (the Lua side: `includes/timeouts.lua`)."""
# A timeout name becomes part of a timeout id, "<stream id>|<name>": stream id
# characters without the separator.
_TIMEOUT_NAME = re.compile(r"[A-Za-z0-9._:@/+=~!$%&()<>,;^#-]{1,100}")


class TimeoutPayload(msgspec.Struct, frozen=True, array_like=True):
    """A scheduled timeout as stored in Redis and delivered by the scheduler."""

    process_type: str
    process_id: str
    name: str
    token: str
    attempt: int
    due_ms: int
    correlation_id: str | None = None
    """Of the step that scheduled it: the step it triggers continues the correlation."""
    metadata: dict[str, str] | None = None
    """Of the step that scheduled it (e.g. its trace context): see `rsaga.interceptors`."""


_payload_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(TimeoutPayload)


def decode_timeout(blob: bytes) -> TimeoutPayload:
    """Decode a stored timeout payload (`msgspec.DecodeError` if corrupt)."""
    return _payload_decoder.decode(blob)


def timeout_id(stream_id: str, name: str) -> str:
    """Id of the pending timeout `name` of the process with stream `stream_id`."""
    return f"{stream_id}{TIMEOUT_ID_SEPARATOR}{name}"


def split_timeout_id(tid: str) -> tuple[str, str]:
    """The process stream id and the timeout name a timeout id is made of."""
    stream_id, _, name = tid.rpartition(TIMEOUT_ID_SEPARATOR)
    return stream_id, name
