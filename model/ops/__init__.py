"""Op tables: one set of functions chosen once when the model is built.

`torch` is the portable reference (CPU, CUDA). Another backend (the NPU's fused torch_npu ops) provides the same
names with the same semantics; layers only ever call `ops.<name>`.

A table is configured for a mode when it is chosen, not through a global: `get_ops("npu", mode="ge")` is the npu
table as traced into a GE graph (attention lengths as tensors), `mode="eager"` the same ops run eagerly (lengths as
host lists). A table module lists the modes it supports in `MODES` (default: eager only); its functions that take
a keyword-only `mode` get it bound here.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from types import SimpleNamespace

OP_NAMES = ("rms_norm", "add_rms_norm", "apply_rope", "cache_write", "attention_lengths", "attention", "linear",
            "route", "moe", "routed_moe")

_TABLES = {"torch": "gptoss.model.ops.torch_ops", "npu": "gptoss.model.ops.npu_ops"}


def _takes_mode(fn) -> bool:
    try:
        param = inspect.signature(fn).parameters.get("mode")
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY


def attention_skips_unseen_slots(name: str, device_type: str, dtype) -> bool:
    """Whether op table `name`'s attention on this device and dtype costs only the slots a query sees (then a
    step may read the whole cache: one kv_len, fewer graphs)."""
    if name not in _TABLES:
        raise ValueError(f"unknown op table '{name}'; available: {sorted(_TABLES)}")
    return importlib.import_module(_TABLES[name]).attention_skips_unseen_slots(device_type, dtype)


def get_ops(name: str = "torch", mode: str = "eager") -> SimpleNamespace:
    """The op table `name` configured for `mode`; its `name` and `mode` attributes say which."""
    if name not in _TABLES:
        raise ValueError(f"unknown op table '{name}'; available: {sorted(_TABLES)}")
    table = importlib.import_module(_TABLES[name])
    check = getattr(table, "check_mode", None)
    if check is not None:
        check(mode)  # a table may refuse a mode with its own reason
    modes = getattr(table, "MODES", ("eager",))
    if mode not in modes:
        raise ValueError(f"op table '{name}' has no mode {mode!r}; its modes: {list(modes)}")
    missing = [n for n in OP_NAMES if not hasattr(table, n)]
    if missing:
        raise RuntimeError(f"op table '{name}' lacks {missing}")
    fns = {}
    for n in OP_NAMES:
        fn = getattr(table, n)
        fns[n] = functools.partial(fn, mode=mode) if _takes_mode(fn) else fn
    return SimpleNamespace(name=name, mode=mode, module=table, **fns)
