"""Rotary position embedding with YaRN frequency scaling (Peng et al., 2023), as GPT-OSS uses it.

inv_freq_i = interpolated_i * (1 - ramp_i) + extrapolated_i * ramp_i, with the ramp between the dimensions that
rotate beta_fast and beta_slow times over the original context; cos/sin are scaled by the attention factor
0.1 * ln(factor) + 1. Rotation is "half-split" (first half of head_dim pairs with the second half).
"""
from __future__ import annotations

import math

import torch

from .config import RopeScaling


def _correction_dim(rotations: float, dim: int, base: float, original_len: int) -> float:
    return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(head_dim: int, rope: RopeScaling) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (fp32, on the host) and the cos/sin scale. A host table even while a model
    is built on the meta device: there, torch's reference arange would import the whole compiler stack (~70 MB)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    pos_freqs = rope.theta ** exponents
    if rope.kind == "default":
        return 1.0 / pos_freqs, 1.0

    low = _correction_dim(rope.beta_fast, head_dim, rope.theta, rope.original_max_position_embeddings)
    high = _correction_dim(rope.beta_slow, head_dim, rope.theta, rope.original_max_position_embeddings)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1 where wavelengths are short: keep original frequencies
    inv_freq = (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate

    scale = rope.attention_factor
    if scale is None:
        scale = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
    return inv_freq, float(scale)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype):
    """cos, sin of shape [*positions.shape, head_dim/2] for integer positions given as a tensor."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)
