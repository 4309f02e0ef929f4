"""A tiny name -> factory registry filled by decorators (the timm habit): adding a source is adding a function."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterable, Iterator, Sequence, TypeVar

from .errors import SpecError

F = TypeVar("F", bound=Callable)


def close_names(name: str, candidates: Iterable[str], n: int = 5, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``candidates`` closest to ``name``, closest first (difflib ratio; a shared prefix alone
    is not closeness: 'resnet19' suggests 'resnet18', not 'resnet101')."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=cutoff)


def did_you_mean(close: list[str]) -> str:
    """" (did you mean 'a', 'b' or 'c'?)" for the suggestions, or "" when there are none."""
    if not close:
        return ""
    quoted = [repr(c) for c in close]
    head = ", ".join(quoted[:-1])
    return f" (did you mean {head + ' or ' if head else ''}{quoted[-1]}?)"


class Registry(Generic[F]):
    """Maps names to callables; ``get`` fails with the known names and a close match."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise SpecError(
                f"unknown {self.kind} {name!r}{did_you_mean(close_names(name, self._items, n=2))}; "
                f"known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


def check_fields(what: str, got: Iterable[str], known: Sequence[str]) -> None:
    """SpecError naming the first of ``got`` not in ``known`` (a misspelt field in a sweep or zoo file), with a close
    match and the known fields."""
    bad = [k for k in got if k not in known]
    if bad:
        close = difflib.get_close_matches(bad[0], list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(f"{what}: unknown field {bad[0]!r}{hint}; known fields: {', '.join(known)}")
