"""`gptoss::grouped_mm`: one matmul per expert over rows already sorted by expert.

    out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]        (offs: cumulative row ends, int32, [E])

It is the portable counterpart of `torch_npu.npu_grouped_matmul` with a cumsum group list. A custom op with a
shape-only fake implementation lets graph capture treat it as one opaque node of static shape; eagerly it runs
torch's grouped matmul, which only touches the experts that received rows.
"""
from __future__ import annotations

import torch


def _fast_path_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm wants one dtype and every stride (and the output's) a multiple of 16 bytes; a
    tensor-parallel slice of an odd expert width (e.g. 72 / 4 = 18 fp32 columns) has neither."""
    if x.dtype != w.dtype or not hasattr(torch, "_grouped_mm"):
        return False
    size = x.element_size()
    strides = [s * size for s in (*x.stride()[:-1], *w.stride()[:-1])] + [w.shape[-1] * size]
    pointers = (x.data_ptr(), w.data_ptr())
    return x.stride(-1) == 1 and w.stride(-1) == 1 and all(v % 16 == 0 for v in (*strides, *pointers))


@torch.library.custom_op("gptoss::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if _fast_path_takes(x, w):
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
