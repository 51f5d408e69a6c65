"""Decode on CUDA as CUDA-graph replays of the compiled decode graphs.

A decode step is dozens of small kernels per layer; launching them one by one costs more than running them at
small batch. Each compiled decode graph is captured once into a `torch.cuda.CUDAGraph` over static buffers: the
token ids and positions (owned here, refilled before every replay), the KV cache (owned by the runtime, allocated
once, so its addresses never change) and the logits (the captured output, overwritten by the next replay).

UNVERIFIED: no GPU has been available to this project's sessions; `tools/dev/cuda_check.py` is the prepared check.
"""
from __future__ import annotations

import torch


class CudaGraphDecode:
    """A decode graph callable (ids, pos, keys, values) replayed as a CUDA graph."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.graph = None

    def __call__(self, ids, pos, keys, values):
        if self.graph is None:
            self._capture(ids, pos, keys, values)
        elif keys[0].data_ptr() != self.cache_ptr:
            raise RuntimeError("CUDA-graph decode was captured on another KV cache; the runtime's cache must be "
                               "allocated once and reused")
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits

    def _capture(self, ids, pos, keys, values) -> None:
        self.ids, self.pos, self.cache_ptr = ids.clone(), pos.clone(), keys[0].data_ptr()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: writes the same K/V the real step writes, so it is harmless
            for _ in range(2):
                self.compiled(self.ids, self.pos, keys, values)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.compiled(self.ids, self.pos, keys, values)


def wrap_decode_graphs(fns: dict, device: torch.device) -> dict:
    if device.type != "cuda":
        return fns
    return {spec: CudaGraphDecode(fn) if spec.kind == "decode" else fn for spec, fn in fns.items()}
