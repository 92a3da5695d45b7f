"""One small registry per component kind (models, datasets, ...), fed by a decorator as in timm."""

from __future__ import annotations

import fnmatch
from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class UnknownName(UserError, KeyError):
    """A name that no registry entry (and no prefix handler) knows."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to entries (model and dataset factories, loss classes, method declarations): `@registry.register`
    adds one, `get` / `names` find them."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, fn: T | None = None, *, name: str | None = None):
        """`@register` files `fn` under its own name; `@register(name="x-y")` under a name Python cannot spell."""
        if fn is None:
            return lambda f: self.register(f, name=name)
        key = name or fn.__name__
        if key in self._entries:
            raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._entries[key] = fn
        return fn

    def get(self, name: str) -> T:
        if name not in self._entries:
            known = ", ".join(self.names()) or "none"
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries
