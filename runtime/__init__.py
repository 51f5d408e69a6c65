"""Serving side: `Runtime` owns the cache and the graphs, samples, streams."""
from .runtime import GenerationResult, GenerationStats, Runtime, TokenEvent

__all__ = ["GenerationResult", "GenerationStats", "Runtime", "TokenEvent"]
