"""The command registry: stores and restores the commands a process issues."""

from __future__ import annotations

from typing import Any

import msgspec

from rsaga.commands import Command
from rsaga.errors import RsagaError, ValidationError
from rsaga.process.events import IssuedCommand


class CommandRegistry:
    """Maps command type names (their msgspec tag) to command types, to store and run them."""

    def __init__(self) -> None:
        self._by_name: dict[str, type[Command[Any]]] = {}
        self._encoder = msgspec.msgpack.Encoder()

    def register(self, *types: type[Command[Any]]) -> None:
        """Register command types; a name taken by another type is an error."""
        for cls in types:
            if not (isinstance(cls, type) and issubclass(cls, Command)):
                raise ValidationError(f"{cls!r} is not a Command subclass")
            name = str(cls.__struct_config__.tag)
            known = self._by_name.get(name)
            if known is not None and known is not cls:
                raise ValidationError(f"command name {name!r} is taken by {known.__qualname__}")
            self._by_name[name] = cls

    def knows(self, command: Command[Any]) -> bool:
        """Whether `command`'s type is the registered one of its name."""
        return self._by_name.get(str(type(command).__struct_config__.tag)) is type(command)

    def encode(self, command: Command[Any]) -> IssuedCommand:
        """The stored form of `command`; its type must be registered."""
        name = str(type(command).__struct_config__.tag)
        if self._by_name.get(name) is not type(command):
            raise ValidationError(
                f"command type {type(command).__qualname__} is not registered; "
                "list it in the process manager's `commands`"
            )
        return IssuedCommand(name, msgspec.Raw(self._encoder.encode(command)))

    def decode(self, issued: IssuedCommand) -> Command[Any]:
        """The command a stored `IssuedCommand` describes."""
        try:
            cls = self._by_name[issued.type]
        except KeyError:
            raise UnknownCommandType(f"command type {issued.type!r} is not registered") from None
        command: Command[Any] = msgspec.msgpack.decode(issued.payload, type=cls)
        return command


class UnknownCommandType(RsagaError):
    """A stored command names a type no registry knows."""
