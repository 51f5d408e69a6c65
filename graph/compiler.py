"""Build (or load) the bounded set of graphs a runtime needs: one per static shape of each entry point.

Backends:
- `eager`: no capture; the entry points run as Python (reference and debugging).
- `inductor`: `torch.compile(fullgraph=True, dynamic=False)` compiled ahead of time per shape with dynamo's
  `aot_compile`, so nothing is traced or compiled while serving. With an artifact directory, each graph is
  serialised (`save_compiled_function`) next to the inductor kernel cache it needs; a later process loads them
  without tracing or compiling, after the manifest's key has been checked.
- `torchair`: Ascend NPU, see graph/torchair.py.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .artifacts import Manifest, artifact_key, open_artifact_dir
from .cuda_graphs import wrap_decode_graphs
from .entry import decode_entry, prefill_entry

BACKENDS = ("eager", "inductor", "torchair")


@dataclass(frozen=True)
class GraphSpec:
    kind: str  # "prefill" or "decode"
    batch: int
    steps: int  # tokens per row: the prefill chunk, 1 for decode
    kv_len: int

    @property
    def name(self) -> str:
        return f"{self.kind}_b{self.batch}_t{self.steps}_kv{self.kv_len}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "batch": self.batch, "steps": self.steps, "kv_len": self.kv_len}


def graph_specs(shapes) -> list[GraphSpec]:
    """Every graph a runtime with this ShapePlan can call."""
    specs = []
    for b in shapes.batch_sizes():
        specs += [GraphSpec("prefill", b, c, kv) for c, kv in shapes.prefill_shapes()]
        specs += [GraphSpec("decode", b, 1, kv) for kv in shapes.kv_lens()]
    return specs


class Graphs:
    """The entry points as callables of static shape; `prefill`/`decode` pick the graph for the inputs."""

    def __init__(self, model, backend: str, fns: dict[GraphSpec, Callable] | None = None):
        self.model, self.backend, self.fns = model, backend, fns or {}
        self.compile_seconds = 0.0
        self.loaded_from: Path | None = None

    def _fn(self, spec: GraphSpec, entry):
        if self.backend == "eager":
            return entry
        fn = self.fns.get(spec)
        if fn is None:
            raise KeyError(f"no {self.backend} graph for {spec.name}: the shape set was built for "
                           f"{sorted(s.name for s in self.fns)[:6]}...")
        return fn

    def prefill(self, ids, start, last, keys, values, kv_len: int):
        spec = GraphSpec("prefill", ids.shape[0], ids.shape[1], kv_len)
        return self._fn(spec, prefill_entry)(self.model, ids, start, last, keys, values, kv_len)

    def decode(self, ids, pos, keys, values, kv_len: int):
        spec = GraphSpec("decode", ids.shape[0], 1, kv_len)
        return self._fn(spec, decode_entry)(self.model, ids, pos, keys, values, kv_len)


def _example_inputs(spec: GraphSpec, model, keys, values):
    dev = model.device
    k = [t[:spec.batch] for t in keys]
    v = [t[:spec.batch] for t in values]
    row = lambda: torch.zeros(spec.batch, dtype=torch.long, device=dev)  # noqa: E731 (distinct: no aliasing guard)
    if spec.kind == "prefill":
        ids = torch.zeros(spec.batch, spec.steps, dtype=torch.long, device=dev)
        return prefill_entry, (model, ids, row(), row(), k, v, spec.kv_len)
    return decode_entry, (model, row(), row(), k, v, spec.kv_len)


@contextmanager
def _inductor_cache(directory: Path | None):
    """Point inductor's kernel cache into the artifact directory, so the directory is self-contained.

    The kernels' cache keys depend on the precompiled header they were built with, and inductor keeps those
    headers in a machine-global directory: they are redirected into the artifacts too, so that a new machine
    (or a cleaned /tmp) can load the kernels without compiling a header first."""
    if directory is None:
        yield
        return
    from torch._inductor import codecache
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    headers = str(directory / "inductor" / "precompiled_headers")
    saved = getattr(codecache, "_HEADER_DIR", None), getattr(codecache, "_HEADER_LOCK_DIR", None)
    redirect = saved[0] is not None and hasattr(codecache._precompile_header, "cache_clear")
    if redirect:
        codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR = headers, os.path.join(headers, "locks")
        codecache._precompile_header.cache_clear()
    try:
        with temporary_cache_dir(str(directory / "inductor")):
            yield
    finally:
        if redirect:
            codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR = saved
            codecache._precompile_header.cache_clear()


def _progress(i: int, n: int, name: str, started: float) -> None:
    if sys.stderr.isatty() or os.environ.get("GPTOSS_PROGRESS"):
        done = int(30 * i / n)
        sys.stderr.write(f"\rcompiling graphs [{'#' * done}{'.' * (30 - done)}] {i}/{n} {name:<28} "
                         f"{time.perf_counter() - started:6.1f}s")
        sys.stderr.write("\n" if i == n else "")
        sys.stderr.flush()


def _compile_inductor(specs, model, keys, values, save_dir: Path | None, progress: bool):
    fns, started = {}, time.perf_counter()
    for i, spec in enumerate(specs):
        if progress:
            _progress(i, len(specs), spec.name, started)
        entry, example = _example_inputs(spec, model, keys, values)
        compiled = torch.compile(entry, fullgraph=True, dynamic=False).aot_compile((example, {}))
        if save_dir is not None:
            compiled.save_compiled_function(str(save_dir / f"{spec.name}.bin"))
        fns[spec] = compiled
    if progress:
        _progress(len(specs), len(specs), "done", started)
    return fns, time.perf_counter() - started


def shapes_record(shapes) -> dict:
    """The runtime settings that determine the graph set (stored in the manifest, so tools can reuse them)."""
    return {"max_batch_size": shapes.max_batch_size, "max_seq_len": shapes.max_seq_len,
            "prefill_chunk": shapes.prefill_chunk, "batch_sizes": shapes.batch_sizes()}


def build_graphs(model, shapes, backend: str, keys, values, *, artifacts: str | Path | None = None,
                 rebuild: bool = False, compile_missing: bool = True, progress: bool = True) -> Graphs:
    """Graphs for every shape of `shapes`, compiled now or loaded from `artifacts`.

    With `artifacts`: a directory holding a matching manifest is loaded (nothing traced or compiled); an empty or
    absent one is filled; one whose manifest does not match raises ArtifactMismatch, unless `rebuild` is set,
    in which case it is wiped and rebuilt. With `compile_missing=False` an absent manifest is an error too."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown graph backend '{backend}'; available: {list(BACKENDS)}")
    if backend == "eager":
        return Graphs(model, backend)
    if backend == "torchair":
        from .torchair import build_torchair_graphs
        return build_torchair_graphs(model, shapes, keys, values, artifacts=artifacts, rebuild=rebuild,
                                     compile_missing=compile_missing, progress=progress)

    specs = graph_specs(shapes)
    dtype, device = model.dtype, model.device
    wanted = artifact_key(model, backend, [s.to_json() for s in specs], dtype, device,
                          code_files=("graph/cuda_graphs.py",))
    wanted["shapes"] = shapes_record(shapes)
    directory = Path(artifacts) if artifacts is not None else None
    if directory is not None:
        manifest = open_artifact_dir(directory, wanted, rebuild=rebuild, compile_missing=compile_missing,
                                     build_hint="python -m gptoss.tools.compile --model MODEL --out "
                                                f"{_top_artifact_dir(directory, model.parallel)}")
        if manifest is not None:
            return _load_inductor(model, specs, manifest, directory)

    with _inductor_cache(directory), torch.no_grad():
        fns, seconds = _compile_inductor(specs, model, keys, values, directory, progress)
    graphs = Graphs(model, backend, wrap_decode_graphs(fns, device))
    graphs.compile_seconds = seconds
    if directory is not None:
        Manifest(wanted, {s.name: f"{s.name}.bin" for s in specs}, seconds).write(directory)
    return graphs


def _top_artifact_dir(directory: Path, parallel) -> Path:
    """The directory a user passes to the tools: under TP, graphs live in its `tp<N>-rank<r>` subdirectory."""
    return directory.parent if parallel.tp_size > 1 and directory.name.startswith(f"tp{parallel.tp_size}-") \
        else directory


def _load_inductor(model, specs, manifest: Manifest, directory: Path) -> Graphs:
    fns = {}
    with _inductor_cache(directory):
        for spec in specs:
            with open(directory / manifest.files[spec.name], "rb") as f:
                fns[spec] = torch.compiler.load_compiled_function(f)
    graphs = Graphs(model, "inductor", wrap_decode_graphs(fns, model.device))
    graphs.loaded_from = directory
    return graphs
