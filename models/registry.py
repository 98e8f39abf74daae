"""Model and add-on registries: a name maps to a builder (models) or a class (add-ons).

A duplicate name raises, as in torchvision and fvcore. A model may declare the defaults of the repository it
comes from (``register_model(name, defaults=..., source=...)``); the flag parser applies them to every flag the
user did not give (flags.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

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


BASE_SOURCE = "fundamentalvision/Deformable-DETR main.py"  # the base flags' defaults (flags.py)


@dataclass(frozen=True)
class ModelDefaults:
    """Flag defaults of the repository a model comes from, where they differ from Deformable-DETR's.

    Attributes:
        source: the official repository and file they were read from ("IDEA-Research/DINO config/...").
        values: flag destination (``args`` attribute) -> value, already of the flag's type.
    """

    source: str = BASE_SOURCE
    values: Mapping[str, Any] = field(default_factory=dict)


MODELS: Registry[Callable[[Any], Any]] = Registry("model")
ADDONS: Registry[type] = Registry("add-on")
MODEL_DEFAULTS: dict[str, ModelDefaults] = {}  # filled with MODELS by register_model


def register_model(name: str, defaults: Mapping[str, Any] | None = None, source: str | None = None) -> Callable:
    """Decorator for ``build_<model>(args) -> (model, criterion, postprocessors)``.

    A builder may carry ``add_args(parser)`` as an attribute to declare its own flag group.

    Args:
        name: the ``-m/--model`` name; a duplicate raises.
        defaults: flag defaults of the model's own repository (flag destination -> value); the parser applies
            them to every flag the user does not give. None: Deformable-DETR's defaults.
        source: where ``defaults`` come from (repository and file), for the run's log.
    """
    register = MODELS.register(name)

    def deco(builder: Callable[[Any], Any]) -> Callable[[Any], Any]:
        register(builder)
        MODEL_DEFAULTS[name] = ModelDefaults(source or BASE_SOURCE, MappingProxyType(dict(defaults or {})))
        return builder
    return deco


def model_defaults(name: str) -> ModelDefaults:
    """The declared defaults of model ``name`` (empty for an unknown name: the parser reports it)."""
    return MODEL_DEFAULTS.get(name, ModelDefaults())


def register_addon(name: str) -> Callable:
    """Decorator for an add-on class (models/addons/base.py ``AddOn``)."""
    return ADDONS.register(name)
