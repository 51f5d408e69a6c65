"""Op tables: one set of functions chosen once when the model is built.

`torch` is the portable reference (CPU, CUDA). Another backend (the NPU's fused torch_npu ops) provides the same
names with the same semantics; layers only ever call `ops.<name>`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

OP_NAMES = ("rms_norm", "add_rms_norm", "apply_rope", "cache_write", "attention", "route", "moe")

_TABLES = {"torch": "gptoss.model.ops.torch_ops", "npu": "gptoss.model.ops.npu_ops"}


def get_ops(name: str = "torch") -> ModuleType:
    if name not in _TABLES:
        raise ValueError(f"unknown op table '{name}'; available: {sorted(_TABLES)}")
    table = importlib.import_module(_TABLES[name])
    missing = [n for n in OP_NAMES if not hasattr(table, n)]
    if missing:
        raise RuntimeError(f"op table '{name}' lacks {missing}")
    return table
