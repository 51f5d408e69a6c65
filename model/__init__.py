"""The tensor-parallel GPT-OSS model: config, op tables, static KV cache, checkpoint loader.

The names below load on first use (PEP 562): `gptoss.model.errors` (the checkpoint errors the tokenizer raises)
must import without torch, for a server's front end."""
from __future__ import annotations

import importlib

_HOMES = {"ConfigError": ".config", "GptOssConfig": ".config", "GptOss": ".gpt_oss", "KVCache": ".kv_cache",
          "Parallel": ".parallel", "ShardPlan": ".parallel"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
