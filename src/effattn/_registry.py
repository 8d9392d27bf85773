"""One registry mechanism for every family: linear ops, sparse methods, mixers, KV policies, bench suites.

A :class:`Registry` maps names to entries (a dataclass, a class or a factory). Entries register
themselves when their module is imported; a registry that names its ``package`` imports every module of
that package on first lookup, so a new method is one module plus one registration and nothing else to
edit. Tests enumerate registries (``names()``, ``items()``) rather than hard-coded lists.

Example::

    >>> from effattn._registry import Registry
    >>> shapes = Registry("shape")
    >>> @shapes.register("square")
    ... def square(n):
    ...     return n * n
    >>> shapes.names(), shapes.get("square")(3)
    (['square'], 9)
    >>> shapes.get("circle")
    Traceback (most recent call last):
    ...
    ValueError: unknown shape 'circle'; registered: ['square']
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Name -> entry, filled by :meth:`register` (as a decorator or a call) when modules are imported.

    ``kind`` names the entries in error messages ("linear op", "mixer", ...). With ``package`` (a dotted
    package name), the first lookup imports every module of that package (sub-packages included), so
    entries defined anywhere in it are present without an explicit import list.
    """

    def __init__(self, kind: str, package: str | None = None):
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string, got {kind!r}")
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._loaded = package is None

    # -- registration -------------------------------------------------------------------------------------
    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """``registry.register("name", entry)``, or ``@registry.register("name")`` on a class/function.

        A name registered twice with a different entry raises (re-registering the same object, as a
        module reload does, is allowed).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(obj: T) -> T:
            old = self._entries.get(name)
            if old is not None and old is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {old!r})")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (an unknown name raises); for tests and examples that register
        a throw-away entry. ``del registry[name]`` does the same."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def __delitem__(self, name: str) -> None:
        self.unregister(name)

    # -- lookup -------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{self.package}."):
            importlib.import_module(info.name)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name raises ``ValueError`` listing the known ones."""
        self._load()
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
        return self._entries[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs sorted by name."""
        self._load()
        return sorted(self._entries.items())

    def keys(self) -> list[str]:
        """Same as :meth:`names` (so ``dict(registry)`` and mapping-style use work)."""
        return self.names()

    def values(self) -> list[T]:
        """The entries, sorted by name."""
        return [entry for _, entry in self.items()]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"
