"""Model and add-on registries: a name maps to a builder (models) or a class (add-ons).

A duplicate name raises, as in torchvision and fvcore.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table filled by decorators."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._items.items())


MODELS: Registry[Callable[[Any], Any]] = Registry("model")
ADDONS: Registry[type] = Registry("add-on")


def register_model(name: str) -> Callable:
    """Decorator for ``build_<model>(args) -> (model, criterion, postprocessors)``.

    A builder may carry ``add_args(parser)`` as an attribute to declare its own flag group.
    """
    return MODELS.register(name)


def register_addon(name: str) -> Callable:
    """Decorator for an add-on class (models/criterion/base.py ``AddOn``)."""
    return ADDONS.register(name)
