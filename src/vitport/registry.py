"""One small registry for everything vitport lets a user name: families, runtimes, fixes, faults.

In the manner of timm's `_registry.py`: items register once under a name, the registry lists
them (tests parametrize over `names()`), and every lookup goes through one normalisation and one
"unknown X; choose one of …" error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from vitport.errors import VitportError

T = TypeVar("T")


class UnknownNameError(VitportError):
    """A name that no registered item has. `param` names the parameter it came from."""

    def __init__(self, kind: str, name: str, choices: list[str], param: str | None = None):
        self.kind, self.name, self.choices, self.param = kind, name, choices, param
        super().__init__(f"unknown {kind} {name!r}; choose one of {', '.join(choices)}")


def normalize(name: str) -> str:
    """The one spelling rule: case and `_`/`-` do not matter, nor surrounding spaces."""
    return name.strip().lower().replace("_", "-")


class Registry(Generic[T]):
    """Named items of one kind, in registration order."""

    def __init__(self, kind: str, param: str | None = None):
        self.kind = kind  # "fix", "runtime", "family", … (used in the error)
        self.param = param  # the library parameter a bad name came from
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        key = normalize(name)
        if key in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[key] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[normalize(name)]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.names(), self.param) from None

    def names(self) -> list[str]:
        return list(self._items)

    def parse(self, text: str | Iterable[str] | None, *, allow_all: bool = False) -> list[str]:
        """Names from a comma-separated string (or an iterable of them), normalised, checked and
        de-duplicated in order. With `allow_all`, "all" means every registered name."""
        if text is None:
            return []
        parts = text.split(",") if isinstance(text, str) else list(text)
        out: list[str] = []
        for part in parts:
            key = normalize(part)
            if not key:
                continue
            if allow_all and key == "all":
                keys = self.names()
            elif key in self._items:
                keys = [key]
            else:
                choices = self.names() + (["all"] if allow_all else [])
                raise UnknownNameError(self.kind, part.strip(), choices, self.param)
            out += [k for k in keys if k not in out]
        return out

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize(name) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def values(self) -> list[T]:
        return list(self._items.values())
