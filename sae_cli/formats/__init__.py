"""SAEs that leave the project and come into it: one module per outside format (docs/formats.md).

`EXPORTERS` / `IMPORTERS`: format name -> "module:function"; the CLI (sae_cli/cli_formats.py) resolves the name,
the module is imported only when used. Which of our variants a format represents is decided from the variant
classes (sae_cli/variants) in each module, never from a second table of variant names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .common import FormatError

EXPORTERS: dict[str, str] = {"saelens": "saelens:export_saelens"}
IMPORTERS: dict[str, str] = {
    "gemmascope": "gemmascope:import_gemmascope",
    "saelens": "saelens:import_saelens",
    "sparsify": "sparsify:import_sparsify",
    "dictionary_learning": "dictionary_learning:import_dictionary_learning",
}


def _resolve(table: dict[str, str], name: str, what: str) -> Callable[..., Any]:
    if name not in table:
        raise FormatError(f"unknown {what} format {name!r}; choose one of: {', '.join(table)}")
    module, func = table[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), func)


def exporter(name: str) -> Callable[..., Any]:
    """The export function of format `name` (FormatError naming the formats there are)."""
    return _resolve(EXPORTERS, name, "export")


def importer(name: str) -> Callable[..., Any]:
    """The import function of format `name` (FormatError naming the formats there are)."""
    return _resolve(IMPORTERS, name, "import")


__all__ = ["EXPORTERS", "IMPORTERS", "FormatError", "exporter", "importer"]
