"""The backend registry: one table, name -> everything that differs between backends.

Adding a backend is one entry here (plus its builder module): the op table it runs, how that table runs, the
cache page size its attention needs, the devices it supports, the environment it needs before the process group
starts, and the function that builds (or loads) its graphs.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Backend:
    name: str
    builder: str  # "module:function" building Graphs from (model, shapes, cache, settings); imported when used
    ops: str = "torch"  # the op table (model/ops) the model is built with
    ops_mode: str = "eager"  # how that table runs (e.g. lengths as tensors inside GE graphs)
    devices: tuple[str, ...] = ("cpu", "cuda")  # the first is the default
    page_slots: int = 1  # the cache's slot count must be a multiple of this (paged attention)
    compiles: bool = True  # builds graphs (and can keep them as artifacts)
    launch_env: dict[str, str] = field(default_factory=dict)  # set before the process group, unless already set
    summary: str = ""

    def build(self, model, shapes, cache, settings):
        module, _, function = self.builder.partition(":")
        fn: Callable = getattr(importlib.import_module(module), function)
        return fn(model, shapes, cache, settings)

    def apply_launch_env(self, environ=None) -> dict:
        """Set this backend's launch environment (values the user already set are kept). Returns what was set."""
        environ = os.environ if environ is None else environ
        changed = {k: v for k, v in self.launch_env.items() if k not in environ}
        environ.update(changed)
        return changed

    def check_device(self, device_type: str) -> None:
        if device_type not in self.devices:
            raise ValueError(f"backend '{self.name}' runs on {', '.join(self.devices)}, not on '{device_type}'")


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("eager", "gptoss.graph.graphs:build_eager", compiles=False, devices=("cpu", "cuda", "npu"),
            summary="no capture: the entry points run as Python"),
    Backend("inductor", "gptoss.graph.inductor:build",
            summary="torch.compile graphs per static shape (CPU, CUDA; CUDA graphs for decode)"),
    Backend("torchair", "gptoss.graph.torchair:build", ops="npu", ops_mode="ge", devices=("npu",), page_slots=128,
            launch_env={"HCCL_OP_EXPANSION_MODE": "AIV"},  # HCCL's all-reduce on the vector cores
            summary="Ascend GE graphs per static shape with the fused torch_npu ops"),
)}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
