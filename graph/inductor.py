"""Inductor graphs (CPU, CUDA): each (entry point, static shape) compiled ahead of time.

`torch.compile(fullgraph=True, dynamic=False)` through dynamo's `aot_compile`, so nothing is traced or compiled
while serving. With an artifact directory, each graph is serialised (`save_compiled_function`) next to the
inductor kernel cache it needs; a later process loads them without tracing or compiling, after the manifest's key
has been checked. On CUDA, decode graphs are replayed as CUDA graphs (graph/cuda_graphs.py).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from .artifacts import ArtifactDir, Manifest, artifact_key
from .cuda_graphs import wrap_decode_graphs
from .graphs import ENTRIES, Graphs, Progress, bind, example_inputs
from .shapes import ShapePlan


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

    headers = str(directory / "precompiled_headers")
    saved = getattr(codecache, "_HEADER_DIR", None), getattr(codecache, "_HEADER_LOCK_DIR", None)
    redirect = saved[0] is not None and hasattr(codecache._precompile_header, "cache_clear")
    if redirect:
        codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR = headers, os.path.join(headers, "locks")
        codecache._precompile_header.cache_clear()
    try:
        with temporary_cache_dir(str(directory)):
            yield
    finally:
        if redirect:
            codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR = saved
            codecache._precompile_header.cache_clear()


def _probe_isas_like_a_new_process(directory: Path) -> None:
    """Leave in `directory` the instruction-set probes a process loading it will look for.

    Inductor learns which vector instruction sets the compiler can build by compiling small probe libraries into
    its cache directory, and remembers the answer for the life of the process. The compiling process may have
    probed before this directory was active (another graph set, another directory), so its probes are not here, and
    every process loading the directory would run the compiler for them (six probes, seconds). A fresh interpreter
    pointed at the directory probes exactly as a loading process will (compiling only what is missing)."""
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(directory))
    subprocess.run([sys.executable, "-c", "from torch._inductor.cpu_vec_isa import pick_vec_isa; pick_vec_isa()"],
                   env=env, check=True, capture_output=True)


def _wrapper(device: torch.device, tp_size: int) -> dict:
    """Inductor options for how a graph's wrapper (the code that allocates buffers and calls the kernels in turn) runs.

    On CPU it is generated as C++ (`cpp_wrapper`): a batch-1 decode step of the bench checkpoint makes ~17 kernel
    and ~17 custom-op calls with ~100 size checks and ~65 tensor views between them, and as Python that costs
    ~0.4 ms of a ~3.8 ms step (measured 0.89x the step time with the C++ wrapper, same compile time; BENCHMARKS.md).
    CUDA keeps the Python wrapper: its decode graphs are replayed as CUDA graphs, which skip the wrapper. So do
    tensor-parallel graphs: torch 2.13's C++ wrapper cannot call the collectives dynamo captures ("arg type Any is
    not yet supported by custom_op_wrapper").

    Size asserts are off: the generated wrapper would check every custom op's output against its fake
    implementation's sizes and strides on each call (91 checks a batch-1 decode step), and torch 2.13's check builds
    a string and a stringstream even when it passes: ~18% of the graph call of a model too small to compute much
    (the fixed cost of a step; BENCHMARKS.md, session 17). The fake implementations are held to the kernels by the
    tests instead (tests/test_kernels.py, compiled == eager)."""
    return {"cpp_wrapper": device.type == "cpu" and tp_size == 1, "size_asserts": False}


def build(model, shapes: ShapePlan, cache, settings) -> Graphs:
    """Graphs for every shape of `shapes` (`settings.compiled="decode"`: the decode shapes; the others run the entry
    points eagerly), compiled now or loaded from `settings.artifacts` (see ArtifactDir)."""
    decode_only = settings.compiled == "decode"
    specs = [s for s in shapes.specs() if not decode_only or s.kind == "decode"]
    eager = {s: bind(ENTRIES[s.kind], model, s.kv_len) for s in shapes.specs() if s not in specs}
    device = model.device
    wrapper = _wrapper(device, model.parallel.tp_size)
    directory = None
    if settings.artifacts is not None:
        directory = ArtifactDir(settings.artifacts, model.parallel.tp_size, model.parallel.rank)
        # inductor's CPU kernels bake the OpenMP thread count in; a decode-only set names what it compiled (a full
        # set's key stays as it was before the option existed)
        only = {"compiled": "decode", "graphs": [s.to_json() for s in specs]} if decode_only else {}
        wanted = artifact_key(model, "inductor", shapes, threads=torch.get_num_threads(), **wrapper, **only)
        manifest = directory.open(wanted, rebuild=settings.rebuild, compile_missing=settings.compile_missing)
        if manifest is not None:
            fns = dict(eager)
            with _inductor_cache(directory.inductor), inductor_config.patch(wrapper):
                for spec in specs:
                    with open(directory.path / manifest.files[spec.name], "rb") as f:
                        fns[spec] = bind(torch.compiler.load_compiled_function(f), model, spec.kv_len)
            graphs = Graphs("inductor", wrap_decode_graphs(fns, device), frozenset(eager), model)
            graphs.loaded_from = directory.path
            return graphs

    fns, progress = dict(eager), Progress(len(specs), settings.progress)
    with _inductor_cache(directory.inductor if directory else None), inductor_config.patch(wrapper), \
            torch.no_grad():
        for i, spec in enumerate(specs):
            progress(i, spec.name)
            entry = ENTRIES[spec.kind]
            example = (model, *example_inputs(spec, model, cache), spec.kv_len)
            compiled = torch.compile(entry, fullgraph=True, dynamic=False).aot_compile((example, {}))
            if directory is not None:
                compiled.save_compiled_function(str(directory.inductor_graph(spec.name)))
            fns[spec] = bind(compiled, model, spec.kv_len)
        progress(len(specs), "done")
    graphs = Graphs("inductor", wrap_decode_graphs(fns, device), frozenset(eager), model)
    graphs.compile_seconds = progress.seconds
    if directory is not None:
        if device.type == "cpu":
            _probe_isas_like_a_new_process(directory.inductor)
        files = {s.name: str(directory.inductor_graph(s.name).relative_to(directory.path)) for s in specs}
        directory.write(Manifest(wanted, files, progress.seconds))
    return graphs
