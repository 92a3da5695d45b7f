"""One small registry per component kind (models, datasets, ...), fed by a decorator as in timm."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")
CLOSE_MATCH = 0.6  # difflib.get_close_matches' default cutoff


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
            raise UnknownName(self._unknown(name))
        return self._entries[name]

    def _unknown(self, name: str) -> str:
        """What an unknown name is told: the registered names closest to it (a typo's), and all of them."""
        close = " or ".join(map(repr, self._closest(name)))
        guess = f"did you mean {close}? " if close else ""
        return f"unknown {self.kind} {name!r}; {guess}known: {', '.join(self.names()) or 'none'}"

    def _closest(self, name: str) -> list[str]:
        """The names most similar to `name` by difflib's ratio, several where they tie (resnet21: resnet20 or
        resnet32), none below difflib's own cutoff for a close match."""
        ratios = {n: difflib.SequenceMatcher(None, name, n).ratio() for n in self._entries}
        best = max(ratios.values(), default=0.0)
        return sorted(n for n, ratio in ratios.items() if ratio == best >= CLOSE_MATCH)

    def summary(self, name: str) -> str:
        """The first paragraph of the entry's docstring on one line, whole: what a listing shows of it."""
        first = inspect.cleandoc(self.get(name).__doc__ or "").split("\n\n")[0]
        return " ".join(first.split())

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries
