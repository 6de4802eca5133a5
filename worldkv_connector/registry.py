"""A generic name registry: policies, compressions and other pluggable parts register a class or
function under a name, and configs validate names against it, so a new policy is one class.

    COMPRESSIONS = Registry("compression")

    @COMPRESSIONS.register("novelty")
    def novelty(...): ...

    COMPRESSIONS.get("novelty")   # the function; an unknown name raises ValueError listing the choices
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind (``kind`` names it in error messages)."""

    def __init__(self, kind: str) -> None:
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"Registry kind={kind!r}: expected a non-empty str")
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the object under ``name``; a name registered twice raises ValueError."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name={name!r}: expected a non-empty str")

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def unregister(self, name: str) -> None:
        """Drop ``name`` if registered (a test's or a plug-in's own entry; the built-ins stay)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}: choose one of {self.names()}") from None

    def check(self, name: object, field: str) -> None:
        """Raise ValueError naming ``field`` unless ``name`` is registered (for config validation)."""
        if not isinstance(name, str) or name not in self._items:
            raise ValueError(f"{field}={name!r} is not allowed: choose one of {self.names()}")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
