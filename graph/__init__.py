"""Graph capture of the model's two entry points (prefill, decode), per static shape, with artifacts on disk."""
from .artifacts import ArtifactDir, ArtifactMismatch, Manifest, code_hash
from .backends import BACKENDS, Backend, get_backend
from .graphs import Graphs
from .shapes import GraphSpec, ShapePlan

__all__ = ["ArtifactDir", "ArtifactMismatch", "BACKENDS", "Backend", "GraphSpec",
           "Graphs", "Manifest", "ShapePlan", "code_hash", "get_backend"]
