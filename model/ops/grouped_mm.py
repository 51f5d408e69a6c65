"""`gptoss::grouped_mm`: one matmul per expert over rows already sorted by expert.

    out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]        (offs: cumulative row ends, int32, [E])

It is the portable counterpart of `torch_npu.npu_grouped_matmul` with a cumsum group list. A custom op with a
shape-only fake implementation lets graph capture treat it as one opaque node of static shape; eagerly it runs
torch's grouped matmul, which only touches the experts that received rows.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("gptoss::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if x.dtype == w.dtype and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[e]
        start = end
    return out


@grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])
