"""A serving process's start-up objects, kept out of Python's garbage collector.

A loaded engine holds ~220k objects the cyclic collector tracks (torch's and the model's modules, functions, code),
alive until the process ends. A full collection walks every one of them: 143-191 ms with the bench or the
gpt-oss-20b runtime loaded (2 cores, Zen 3), and the engine does not step meanwhile, so every stream stalls. They
are rare (CPython starts one only once the objects that survived since the last reach a quarter of those it already
holds: `tools.serve` on the bench preset served 400 requests in 98 s without one) but they come: in the load
tool's engine process (64 requests served, then its comparisons; 4.5 minutes), 6 of 206-287 ms after the load.
Frozen once the model is loaded (`gc.freeze`: moved to a generation no collection walks), a full collection walks
only what was made since: 8 of 0.8-2.8 ms in the same test, two runs (BENCHMARKS.md, session 39). vLLM and SGLang
do the same after their start-up."""
from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect once (what start-up left as garbage goes now rather than being kept frozen), then freeze every object
    left. Call it once, in the serving process itself (not in a library caller's: frozen objects that become garbage
    later are never collected)."""
    gc.collect()
    gc.freeze()
