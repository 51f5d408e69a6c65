"""Serving side: `Runtime` owns the cache and the graphs, samples, streams; `Settings` says how it runs.

The names below load on first use (gptoss.model.lazy_exports), so importing a torch-free module of this package
(requests, the tokenizer, harmony, grammars: what a server's front end needs) does not load torch with the engine."""
from gptoss.model.lazy_exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "GenerationResult": ".runtime", "GenerationStats": ".runtime", "Runtime": ".runtime", "Settings": ".settings",
    "TokenEvent": ".request"})
