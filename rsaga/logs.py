"""Structured logs: key=value or JSON lines, with correlation and causation ids.

Log calls about an event or a command pass ``extra=event_fields(event)``; the
formatter prints every such field, so a line can be traced across handlers,
processes and services by its correlation id.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

# C0 and C1 controls (ESC starts terminal sequences that retitle windows or hide
# text) and the bidirectional overrides that reorder what a reader sees.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

_FIELDS = ("correlation_id", "causation_id", "event_id", "stream_id", "version", "group")


def event_fields(event: Any) -> dict[str, Any]:
    """The ids of a `RecordedEvent` as logging extras."""
    return {
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "event_id": event.event_id,
        "stream_id": event.stream_id,
        "version": event.version,
    }


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                fields[name] = value
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def printable(text: str) -> str:
    """`text` with every control character escaped (``\\x1b``, ``\\n``), safe to show a
    person: data read from Redis must not drive their terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\\') or _CONTROL.search(text):
        return json.dumps(text)  # escapes every control character
    return text


def configure(format: str = "kv", level: str = "INFO") -> None:
    """Send rsaga's (and everything's) logs to stderr in `format` ("kv" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json=format == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
