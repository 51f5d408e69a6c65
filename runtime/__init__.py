"""Serving side: `Runtime` owns the cache and the graphs, samples, streams; `Settings` says how it runs."""
from .runtime import GenerationResult, GenerationStats, Runtime, TokenEvent
from .settings import Settings

__all__ = ["GenerationResult", "GenerationStats", "Runtime", "Settings", "TokenEvent"]
