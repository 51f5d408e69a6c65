"""Ascend graphs with torchair: one GE graph (or aclgraph) per static shape of each entry point, cached per rank.

- Mode: `max-autotune` compiles each graph to a static GE graph with `frozen_parameter` (weights are constants, not
  per-call inputs), from a model built with `ops_mode="ge"` (attention lengths as tensors). Not tiling sink
  (`tiling_schedule_optimize`): FIA in TND layout (the only one with learnable_sink) refuses it ("When layout is
  TND/NTD_TND, not support tiling_schedule_optimize = True or config mode is reduce-overhead!", hicann
  ops-transformer prompt_flash_attention_tiling.cpp; vllm-ascend #5771). aclgraph (`npugraph_ex`, formerly
  `reduce-overhead`) is withdrawn for the same kernel message and because torchair refreshes FIA's lengths at
  replay only from SymInt graph inputs (see model/ops/npu_ops.py). The installed torchair is asked whether it
  accepts the mode before anything is built (torchair 7.3.0's CompilerConfig knows only max-autotune and
  reduce-overhead; newer ones select aclgraph through `backend="npugraph_ex"`).
- Entry points: prefill and decode are separate graphs, one per (batch, chunk, kv_len) of the ShapePlan. Each is a
  bound method (`prefill` / `decode`) of a small nn.Module `GraphEntry` holding the model and the static `kv_len`,
  because `torchair.inference.cache_compile` only takes bound methods of an nn.Module (full graph, no RNG).
- Artifacts: `cache_compile(..., dynamic=False, cache_dir=<artifacts>/tp<N>-rank<r>/torchair/<graph>, global_rank=r,
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

import os

import torch
from torch import nn

from .artifacts import ArtifactDir, Manifest, artifact_key
from .backends import get_backend
from .entry import decode_entry, mixed_entry, prefill_entry
from .graphs import Graphs, Progress, example_inputs
from .shapes import GraphSpec, ShapePlan

MODES = ("max-autotune",)
WITHDRAWN = {"npugraph_ex": "aclgraph", "reduce-overhead": "aclgraph"}
OPS_MODE = {"max-autotune": "ge"}  # the npu op table's mode each torchair mode traces


def configure_launch_env(environ=None) -> dict:
    """Set the Ascend launch environment (the registry's entry for this backend). Returns what was set."""
    return get_backend("torchair").apply_launch_env(environ)


def torchair_options(mode: str = "max-autotune") -> dict:
    """The torchair options this project uses for `mode` (recorded in the manifest)."""
    if mode in WITHDRAWN:
        raise ValueError(f"torchair mode {mode!r} ({WITHDRAWN[mode]}) is withdrawn: FIA in TND layout refuses "
                         f"it (\"not support ... config mode is reduce-overhead\", prompt_flash_attention_tiling.cpp) "
                         f"and torchair's aclgraph updater refreshes FIA lengths only from SymInt graph inputs; "
                         f"use 'max-autotune'")
    if mode not in MODES:
        raise ValueError(f"unknown torchair mode {mode!r}; choose one of {list(MODES)}")
    # no tiling_schedule_optimize: FIA in TND (learnable_sink) refuses tiling sink
    return {"mode": mode, "experimental_config.frozen_parameter": True,
            "experimental_config.tiling_schedule_optimize": False}


def check_torchair_mode(torchair, torch_npu, mode: str) -> None:
    """Ask the installed torchair whether its CompilerConfig takes `mode` (the accepted set changed between
    versions) before anything is built; the error names the version."""
    try:
        torchair.CompilerConfig().mode = mode
    except ValueError as e:
        version = getattr(torchair, "__version__", None) or f"bundled with torch_npu {torch_npu.__version__}"
        raise ValueError(f"torchair ({version}) does not accept mode {mode!r}: {e}") from e


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

    def mixed(self, ids, pos, keys, values, chunk_ids, start, last, chunk_keys, chunk_values):
        return mixed_entry(self.model, ids, pos, keys, values, chunk_ids, start, last, chunk_keys, chunk_values,
                           self.spec.kv_len)

    def method(self):
        return getattr(self, self.spec.kind)


def _versions(torch_npu, torchair) -> dict:
    cann = "unknown"
    try:
        cann = str(torch_npu.npu.utils.get_cann_version(module="CANN"))
    except Exception:  # older torch_npu: no query API; the torch_npu version pins a CANN range anyway
        pass
    return {"torch_npu": getattr(torch_npu, "__version__", "unknown"), "cann": cann,
            "torchair": getattr(torchair, "__version__", "bundled")}


def torchair_key(model, shapes: ShapePlan, mode: str, torch_npu, torchair) -> dict:
    return artifact_key(model, "torchair", shapes, torchair_options=torchair_options(mode),
                        **_versions(torch_npu, torchair))


def _compile_all(model, specs, cache, config, torchair, directory: ArtifactDir | None, ge_cache: bool,
                 progress: Progress):
    """Wrap every entry, run it once on example inputs (this traces and compiles, or loads torchair's cache), and
    return {spec: callable}, {spec.name: compiled file relative to the rank directory}."""
    fns, files = {}, {}
    rank = model.parallel.rank
    backend = None if directory is not None else torchair.get_npu_backend(compiler_config=config)
    for i, spec in enumerate(specs):
        progress(i, spec.name)
        entry = GraphEntry(model, spec)
        if directory is None:
            fn = torch.compile(entry.method(), backend=backend, fullgraph=True, dynamic=False)
        else:
            fn = torchair.inference.cache_compile(entry.method(), config=config, dynamic=False,
                                                  cache_dir=str(directory.torchair_graph(spec.name)),
                                                  global_rank=rank, tp_rank=rank, pp_rank=0, ge_cache=ge_cache)
        fn(*example_inputs(spec, model, cache))  # compile now (or load), never while serving
        fns[spec] = fn
        if directory is not None:
            found = sorted(directory.torchair_graph(spec.name).rglob("compiled_module"))
            if not found:
                raise RuntimeError(f"torchair wrote no compiled_module under {directory.torchair_graph(spec.name)}")
            files[spec.name] = str(found[0].relative_to(directory.path))
    progress(len(specs), "done")
    return fns, files


def build(model, shapes: ShapePlan, cache, settings, mode: str | None = None) -> Graphs:
    """Graphs for every shape of `shapes` on an Ascend device, compiled by torchair now, or loaded from this rank's
    torchair caches under `settings.artifacts` after the project's manifest has matched (see the module docstring)."""
    from gptoss.model.ops import npu_ops  # imports torch_npu, or says what to install

    if model.ops_name != "npu":
        raise ValueError(f"the torchair backend needs the model built with ops='npu' (the fused torch_npu ops have "
                         f"GE converters); this model uses ops={model.ops_name!r}")
    mode = mode or os.environ.get("GPTOSS_TORCHAIR_MODE", "max-autotune")
    options = torchair_options(mode)
    torch_npu, torchair = npu_ops._npu(), npu_ops._torchair()
    check_torchair_mode(torchair, torch_npu, mode)
    if model.ops_mode != OPS_MODE[mode]:
        raise ValueError(f"torchair mode {mode!r} traces the npu op table in mode {OPS_MODE[mode]!r}; this model "
                         f"was built with ops_mode={model.ops_mode!r} (load_model(..., ops='npu', "
                         f"ops_mode={OPS_MODE[mode]!r}))")
    configure_launch_env()
    config = compiler_config(torchair, mode)
    specs = shapes.specs()
    ge_cache = options["mode"] == "max-autotune"

    directory, wanted, loading = None, None, False
    if settings.artifacts is not None:
        directory = ArtifactDir(settings.artifacts, model.parallel.tp_size, model.parallel.rank)
        wanted = torchair_key(model, shapes, mode, torch_npu, torchair)
        # torchair would load whatever cache it finds: only a directory whose manifest matches is loaded
        loading = directory.open(wanted, rebuild=settings.rebuild,
                                 compile_missing=settings.compile_missing) is not None

    # Every shape goes through the same entry code objects: dynamo counts each shape as a recompile of them, and
    # under fullgraph its default limit (8) is a hard failure. The shape set is bounded and known: allow it.
    limit = len(specs) + 8
    progress = Progress(len(specs), settings.progress)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=limit,
                                                     accumulated_recompile_limit=max(limit, 256)):
        fns, files = _compile_all(model, specs, cache, config, torchair, directory, ge_cache, progress)
    graphs = Graphs("torchair", fns, model=model)
    if loading:
        graphs.loaded_from = directory.path
    else:
        graphs.compile_seconds = progress.seconds
        if directory is not None:
            directory.write(Manifest(wanted, files, progress.seconds))
    return graphs
