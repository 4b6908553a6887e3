"""Names of handlers and process types: they become consumer groups and key parts."""

from __future__ import annotations

import re

from rsaga.errors import ValidationError

_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def check_name(cls: type) -> str:
    """The class's `name`, if usable as a consumer-group name; else `ValidationError`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValidationError(
            f"{cls.__qualname__}.name must be 1-100 of [A-Za-z0-9._-], got {name!r}"
        )
    return name
