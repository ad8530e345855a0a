"""Name -> implementation tables, one per kind (algorithm, dataset, model, partition, adapter placement).

A new implementation joins its kind by registering itself where it is defined::

    @ALGORITHMS.register("fedfoo")
    class FedFoo(Algorithm): ...

and from then on the configuration accepts its name, ``pfedlora list`` shows it and every "unknown value"
message lists it; nothing else names it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from pfedlora.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Implementations of one kind, by name, in the order they registered."""

    def __init__(self, key: str) -> None:
        self.key = key
        """The configuration key that names a member (used in error messages), e.g. ``data.dataset``."""
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a name registers once."""
        if name in self._entries:
            raise ValueError(f"{self.key}: {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str, key: str | None = None) -> T:
        """The entry named ``name``, or ConfigError naming ``key`` (default: this registry's) and the allowed
        names."""
        if name not in self._entries:
            raise ConfigError(f"{key or self.key}: unknown value {name!r}; allowed: {', '.join(self)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)
