"""Serving side: `Runtime` owns the cache and the graphs, samples, streams; `Settings` says how it runs.

The names below load on first use (PEP 562), so importing a torch-free module of this package (requests, the
tokenizer, harmony, grammars: what a server's front end needs) does not load torch with the engine."""
from __future__ import annotations

import importlib

_HOMES = {"GenerationResult": ".runtime", "GenerationStats": ".runtime", "Runtime": ".runtime",
          "Settings": ".settings", "TokenEvent": ".request"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
