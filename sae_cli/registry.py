"""Name -> SAE variant class. The CLI choices, the contract tests and docs/variants.md iterate this registry;
adding a variant is one new file in sae_cli/variants/ that calls `register`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .variants.base import SAE

_REGISTRY: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: `@register` on a subclass of SAE with a `name` class attribute."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"SAE variant {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    from . import variants

    for mod in pkgutil.iter_modules(variants.__path__):
        if mod.name != "base":
            importlib.import_module(f"{variants.__name__}.{mod.name}")


def variant_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_variant(name: str) -> type[SAE]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown SAE variant {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        ) from None
