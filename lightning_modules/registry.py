"""Name -> factory registries with errors that list the valid names (networks, losses, optimizers)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from errors import ConfigError

T = TypeVar("T")


def unknown_name_message(kind: str, key: str, name: str, known: Iterable[str], extra: str = "") -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{key}: unknown {kind} '{name}'.{hint} Known: {', '.join(known)}{extra}."


class Registry(Generic[T]):
    """A dictionary of named factories.

    Args:
        kind: what is registered ("loss", "optimizer"), for messages.
        key: the config key users set ("model.loss"), for messages.

    Example:
        >>> losses = Registry("loss", "model.loss")
        >>> @losses.register("ce")
        ... class CE: ...
        >>> losses.available()
        ['ce']
    """

    def __init__(self, kind: str, key: str):
        self.kind = kind
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(unknown_name_message(self.kind, self.key, name, self._items))
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def available(self) -> list[str]:
        return sorted(self._items)
