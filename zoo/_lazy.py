"""Lazy package attributes: a package names what it exports and the module holding it; the module is imported on
first access, so importing the package stays lean (the serving path imports no training stack)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_getattr(package: str, table: Mapping[str, tuple[str, str]], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``table[name] = (module, attribute)`` on first use (cached in
    ``namespace``, the package's ``globals()``)."""

    def __getattr__(name: str) -> Any:
        if name in table:
            mod, attr = table[name]
            value = getattr(importlib.import_module(mod), attr)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
