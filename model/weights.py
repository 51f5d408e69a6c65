"""Weights in the form they are kept in memory, and the two formats a model can be loaded in.

- "dense": every weight in the runtime dtype (MXFP4 experts decoded at load), as accelerators want them.
- "published": weights stay as the checkpoint stores them: MXFP4 experts packed (blocks and scales), dense matrices
  (q/k/v/o, router, embedding, lm_head) in their stored dtype (bf16 as published; fp32 stays fp32). Norms, sinks
  and biases are held in the runtime dtype. Activations stay in the runtime dtype, so with exact weights the
  result is the dense model's up to summation order.

A layer never looks at the format: it hands its weight to the op table (`ops.linear`, `ops.moe`), and the table
picks the kernel from the weight's dtype or type.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .kernels import mxfp4_grouped_mm  # noqa: F401  (the import registers the gptoss:: kernel ops)
from .mxfp4 import BLOCK_SIZE

WEIGHT_FORMATS = ("published", "dense")


class PackedMxfp4(NamedTuple):
    """An expert weight [E, out, in] as published: `blocks` uint8 [E, out, G, 16], `scales` uint8 [E, out, G].
    `pad` = (before, after): zero columns that put this rank's input slice onto the 32-value block grid (a
    tensor-parallel split inside a block); codes outside the slice are zero."""

    blocks: torch.Tensor
    scales: torch.Tensor
    pad: tuple[int, int]


def block_span(start: int, length: int) -> tuple[int, int, int, int]:
    """The 32-value blocks covering columns [start, start + length): (first block, end block, columns before the
    slice in the first block, columns after it in the last)."""
    first, end = start // BLOCK_SIZE, -(-(start + length) // BLOCK_SIZE)
    return first, end, start - first * BLOCK_SIZE, end * BLOCK_SIZE - start - length


def frozen(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    """A weight the loader fills (uint8 needs requires_grad=False; every weight is inference-only anyway)."""
    return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b, W [out, in] in whatever dtype the loader stored; `ops.linear` picks the kernel."""

    def __init__(self, in_features: int, out_features: int, ops, bias: bool = True):
        super().__init__()
        self.ops = ops
        self.weight = frozen(out_features, in_features)
        self.bias = frozen(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)
