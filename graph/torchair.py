"""Ascend graphs with torchair: one GE graph (or aclgraph) per static shape of each entry point, cached per rank.

- Mode: `max-autotune` (default) compiles each graph to a static GE graph, with `frozen_parameter` (weights are
  constants, not per-call inputs) and `tiling_schedule_optimize` (static-shape tiling on device);
  `npugraph_ex` (aclgraph capture/replay; `reduce-overhead` is its deprecated name) is the option. Choose with
  `mode=` or `GPTOSS_TORCHAIR_MODE`.
- Entry points: prefill and decode are separate graphs, one per (batch, chunk, kv_len) of the ShapePlan. Each is a
  bound method (`prefill` / `decode`) of a small nn.Module `GraphEntry` holding the model and the static `kv_len`,
  because `torchair.inference.cache_compile` only takes bound methods of an nn.Module (full graph, no RNG).
- Artifacts: `cache_compile(..., dynamic=False, cache_dir=<artifacts>/rank<r>/torchair/<graph>, global_rank=r,
  tp_rank=r, pp_rank=0, ge_cache=True)` stores dynamo's output (and the GE .om) per rank and per graph. torchair's
  own cache key is an md5 of the module repr and the config only: not the model code, not the weights, not the
  input shapes, and its guards are skipped on load, so a stale cache would run silently. The project's manifest
  (graph.artifacts: model config, dtype, TP size and rank, op table, static shapes, torch / torch_npu / CANN /
  torchair versions, torchair options, sha256 of model/ and graph/) sits in each rank's directory and is checked
  before torchair sees the cache: a mismatch raises ArtifactMismatch, or with `rebuild` wipes and recompiles.
- Launch: `configure_launch_env()` sets `HCCL_OP_EXPANSION_MODE=AIV` (all-reduce expanded onto the vector cores)
  unless the user set it; the launcher calls it before the process group starts, and building calls it again
  (HCCL reads it when a communicator is created, at the first collective).
"""
from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import torch
from torch import nn

from .artifacts import Manifest, artifact_key, open_artifact_dir
from .compiler import Graphs, GraphSpec, _example_inputs, _progress, graph_specs
from .entry import decode_entry, prefill_entry

MODES = ("max-autotune", "npugraph_ex", "reduce-overhead")
HCCL_ENV = {"HCCL_OP_EXPANSION_MODE": "AIV"}


def configure_launch_env(environ=None) -> dict:
    """Set the Ascend launch environment (values the user already set are kept). Returns what was set."""
    environ = os.environ if environ is None else environ
    changed = {}
    for k, v in HCCL_ENV.items():
        if k not in environ:
            environ[k] = v
            changed[k] = v
    return changed


def torchair_options(mode: str = "max-autotune") -> dict:
    """The torchair options this project uses for `mode` (recorded in the manifest)."""
    if mode not in MODES:
        raise ValueError(f"unknown torchair mode {mode!r}; choose one of {list(MODES)}")
    if mode == "max-autotune":
        return {"mode": mode, "experimental_config.frozen_parameter": True,
                "experimental_config.tiling_schedule_optimize": True}
    return {"mode": mode}  # tiling_schedule_optimize is GE-only; aclgraph keeps parameter addresses anyway


def compiler_config(torchair, mode: str = "max-autotune"):
    """A `torchair.CompilerConfig` for `mode` (pure: depends only on its arguments)."""
    config = torchair.CompilerConfig()
    for name, value in torchair_options(mode).items():
        target = config
        *path, leaf = name.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return config


class GraphEntry(nn.Module):
    """One static shape of one entry point as a bound method of a module. The repr names the shape, so torchair's
    module-repr-based cache key differs between shapes too."""

    def __init__(self, model: nn.Module, spec: GraphSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def extra_repr(self) -> str:
        return f"graph={self.spec.name}"

    def prefill(self, ids, start, last, keys, values):
        return prefill_entry(self.model, ids, start, last, keys, values, self.spec.kv_len)

    def decode(self, ids, pos, keys, values):
        return decode_entry(self.model, ids, pos, keys, values, self.spec.kv_len)

    def method(self):
        return getattr(self, self.spec.kind)


class _Bound:
    """Adapts a compiled entry method to the Graphs calling convention (model, *inputs, kv_len)."""

    def __init__(self, spec: GraphSpec, fn):
        self.spec, self.fn = spec, fn

    def __call__(self, model, *args):
        *inputs, kv_len = args
        if kv_len != self.spec.kv_len:
            raise ValueError(f"graph {self.spec.name} was built for kv_len={self.spec.kv_len}, called with {kv_len}")
        return self.fn(*inputs)


def rank_directory(artifacts: str | Path, parallel) -> Path:
    """Each tensor-parallel rank keeps its own manifest and torchair cache."""
    return Path(artifacts) / f"rank{parallel.rank}"


def _versions(torch_npu, torchair) -> dict:
    cann = "unknown"
    try:
        cann = str(torch_npu.npu.utils.get_cann_version(module="CANN"))
    except Exception:  # older torch_npu: no query API; the torch_npu version pins a CANN range anyway
        pass
    return {"torch_npu": getattr(torch_npu, "__version__", "unknown"), "cann": cann,
            "torchair": getattr(torchair, "__version__", "bundled")}


def torchair_key(model, specs, mode: str, torch_npu, torchair) -> dict:
    dtype, device = model.dtype, model.device
    graphs = [s.to_json() for s in specs]
    if "code_files" in inspect.signature(artifact_key).parameters:  # hash this file with the model code
        key = artifact_key(model, "torchair", graphs, dtype, device, code_files=("graph/torchair.py",))
    else:
        key = artifact_key(model, "torchair", graphs, dtype, device)
    key.pop("threads", None)  # host thread count: inductor CPU kernels only
    key.update(_versions(torch_npu, torchair))
    key["torchair_options"] = torchair_options(mode)
    return key


def _cache_dir(directory: Path, spec: GraphSpec) -> Path:
    return directory / "torchair" / spec.name


def _compile_all(model, specs, keys, values, config, torchair, directory: Path | None, ge_cache: bool,
                 progress: bool):
    """Wrap every entry, run it once on example inputs (this traces and compiles, or loads torchair's cache), and
    return {spec: callable}, {spec.name: compiled file relative to directory}."""
    fns, files, started = {}, {}, time.perf_counter()
    rank = model.parallel.rank
    backend = None if directory is not None else torchair.get_npu_backend(compiler_config=config)
    for i, spec in enumerate(specs):
        if progress:
            _progress(i, len(specs), spec.name, started)
        entry = GraphEntry(model, spec)
        if directory is None:
            fn = torch.compile(entry.method(), backend=backend, fullgraph=True, dynamic=False)
        else:
            fn = torchair.inference.cache_compile(entry.method(), config=config, dynamic=False,
                                                  cache_dir=str(_cache_dir(directory, spec)), global_rank=rank,
                                                  tp_rank=rank, pp_rank=0, ge_cache=ge_cache)
        _, example = _example_inputs(spec, model, keys, values)
        fn(*example[1:-1])  # compile now (or load), never while serving
        fns[spec] = _Bound(spec, fn)
        if directory is not None:
            found = sorted(_cache_dir(directory, spec).rglob("compiled_module"))
            if not found:
                raise RuntimeError(f"torchair wrote no compiled_module under {_cache_dir(directory, spec)}")
            files[spec.name] = str(found[0].relative_to(directory))
    if progress:
        _progress(len(specs), len(specs), "done", started)
    return fns, files, time.perf_counter() - started


def build_torchair_graphs(model, shapes, keys, values, *, artifacts: str | Path | None = None,
                          rebuild: bool = False, compile_missing: bool = True, progress: bool = True,
                          mode: str | None = None) -> Graphs:
    """Graphs for every shape of `shapes` on an Ascend device, compiled by torchair now, or loaded from the per-rank
    torchair caches under `artifacts` after the project's manifest has matched (see the module docstring)."""
    from gptoss.model.ops import npu_ops  # imports torch_npu, or says what to install

    if model.ops_name != "npu":
        raise ValueError(f"the torchair backend needs the model built with ops='npu' (the fused torch_npu ops have "
                         f"GE converters); this model uses ops={model.ops_name!r}")
    mode = mode or os.environ.get("GPTOSS_TORCHAIR_MODE", "max-autotune")
    options = torchair_options(mode)
    configure_launch_env()
    torch_npu, torchair = npu_ops._npu(), npu_ops._torchair()
    npu_ops.set_graph_mode(mode)
    config = compiler_config(torchair, mode)
    specs = graph_specs(shapes)
    ge_cache = options["mode"] == "max-autotune"

    directory, wanted, loading = None, None, False
    if artifacts is not None:
        directory = rank_directory(artifacts, model.parallel)
        wanted = torchair_key(model, specs, mode, torch_npu, torchair)
        # torchair would load whatever cache it finds: only a directory whose manifest matches is loaded
        loading = open_artifact_dir(directory, wanted, rebuild=rebuild, compile_missing=compile_missing,
                                    build_hint="python -m gptoss.tools.compile --backend torchair ...") is not None

    capture = mode != "max-autotune"  # aclgraph takes FIA lengths as host ints: let dynamo capture .tolist()
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=capture):
        fns, files, seconds = _compile_all(model, specs, keys, values, config, torchair, directory, ge_cache,
                                           progress)
    graphs = Graphs(model, "torchair", fns)
    if loading:
        graphs.loaded_from = directory
    else:
        graphs.compile_seconds = seconds
        if directory is not None:
            Manifest(wanted, files, seconds).write(directory)
    return graphs
