"""A package's names loaded on first use (PEP 562), so importing one torch-free module of the package (a server's
front end does) does not import the rest, and torch with it."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, homes: dict[str, str]):
    """`(__getattr__, __all__)` for `package`, whose name N lives in its module `homes[N]` (relative, e.g.
    ".config")."""

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name], package), name)

    return __getattr__, sorted(homes)
