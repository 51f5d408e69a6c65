"""Graph capture of the model's two entry points (prefill, decode), per static shape, with artifacts on disk."""
from .artifacts import ArtifactMismatch, Manifest, code_hash
from .compiler import BACKENDS, Graphs, GraphSpec, build_graphs, graph_specs

__all__ = ["ArtifactMismatch", "BACKENDS", "Graphs", "GraphSpec", "Manifest", "build_graphs", "code_hash",
           "graph_specs"]
