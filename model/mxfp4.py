"""MXFP4 codec of GPT-OSS's published checkpoints.

An MXFP4 tensor stores 32-value blocks along its last (input) dimension: each value is a 4-bit fp4 e2m1 code
and each block shares one e8m0 scale (a biased power-of-two exponent, bias 127).  On disk a tensor whose
logical shape is ``[..., K]`` is a pair

* ``blocks``: ``uint8 [..., K // 32, 16]`` - two codes per byte; element ``j`` of a block is in byte ``j // 2``,
  in the **low** nibble for even ``j`` and the high nibble for odd ``j``;
* ``scales``: ``uint8 [..., K // 32]`` - value of a block element = ``FP4_E2M1_VALUES[code] * 2 ** (scale - 127)``.

Code ``c``: bit 3 is the sign, bits 0-2 index the magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (``-0.0`` is code 8).

:func:`dequantize_mxfp4` is the decoder (it does *not* transpose: GPT-OSS stores the expert weights as
``[E, out, in]`` and the loader decides the layout it needs); :func:`quantize_mxfp4` is an encoder used to write
random checkpoints in the published layout.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FP4_E2M1_VALUES", "BLOCK_SIZE", "SCALE_BIAS", "dequantize_mxfp4", "quantize_mxfp4"]

#: Values of the 16 fp4 e2m1 codes, indexed by the 4-bit code (sign in bit 3).
FP4_E2M1_VALUES: tuple[float, ...] = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip

#: Values per block (sharing one scale).
BLOCK_SIZE = 32
#: Bias of the e8m0 scale exponent.
SCALE_BIAS = 127
#: Largest fp4 e2m1 magnitude.
FP4_MAX = 6.0

# Rows (blocks) processed at a time, so temporaries stay a few MB whatever the tensor size.
_ROWS_PER_CHUNK = 1 << 16


def _byte_lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2] table: the two values a byte decodes to (low nibble first)."""
    values = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([values[byte & 0x0F], values[byte >> 4]], dim=1).to(dtype=dtype, device=device)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode MXFP4 ``blocks [..., G, 16]`` (uint8) and ``scales [..., G]`` (uint8) to ``[..., G * 32]``.

    Each value is ``FP4_E2M1_VALUES[code]`` in ``dtype`` times ``2 ** (scale - 127)`` applied with
    :func:`torch.ldexp` (so the result is the exact value rounded once to ``dtype``).  No transpose.  Works in
    chunks of rows, so the only full-size allocation is the output.
    """
    if blocks.dtype != torch.uint8:
        raise TypeError(f"blocks must be uint8, got {blocks.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_SIZE // 2:
        raise ValueError(f"blocks must have shape [..., G, {BLOCK_SIZE // 2}], got {tuple(blocks.shape)}")
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"scales shape {tuple(scales.shape)} must equal blocks.shape[:-1] {tuple(blocks.shape[:-1])}")
    if scales.dtype.is_floating_point or scales.dtype.is_complex:
        raise TypeError(f"scales must be an integer (uint8) tensor, got {scales.dtype}")

    *prefix, groups, _ = blocks.shape
    rows = math.prod(prefix) * groups
    out = torch.empty(rows, BLOCK_SIZE, dtype=dtype, device=blocks.device)
    if rows:
        lut = _byte_lut(dtype, blocks.device)
        blk = blocks.reshape(rows, BLOCK_SIZE // 2)
        scl = scales.reshape(rows, 1)
        for r0 in range(0, rows, _ROWS_PER_CHUNK):
            r1 = min(r0 + _ROWS_PER_CHUNK, rows)
            sub = out[r0:r1]
            idx = blk[r0:r1].reshape(-1).to(torch.int64)
            # One gather writes both nibbles of every byte: out row = [lo0, hi0, lo1, hi1, ...].
            torch.index_select(lut, 0, idx, out=sub.view(-1, 2))
            del idx
            exp = scl[r0:r1].to(torch.int32) - SCALE_BIAS
            torch.ldexp(sub, exp, out=sub)
    return out.view(*prefix, groups * BLOCK_SIZE)


def _block_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Smallest e with ``amax <= 6 * 2**e``, clamped to [-127, 127]; 0 for an all-zero block (int32).

    Exact, from the float32 bits: with ``amax = m * 2**p`` (m in [1, 2)) and ``6 * 2**e = 1.5 * 2**(e + 2)``,
    ``e = p - 2`` if ``m <= 1.5`` else ``p - 1``.  (A subnormal amax gives e <= -128, clamped to -127 as it should.)
    """
    bits = amax.to(torch.float32).contiguous().view(torch.int32)
    e = (bits >> 23) - (SCALE_BIAS + 2) + ((bits & 0x7FFFFF) > 0x400000).to(torch.int32)
    e = torch.where(bits == 0, torch.zeros_like(e), e)
    return e.clamp_(-SCALE_BIAS, SCALE_BIAS)


def _e2m1_code(a: torch.Tensor) -> torch.Tensor:
    """fp4 e2m1 magnitude code (0..7, uint8) of ``a`` in [0, 6], rounded to nearest, ties to even.

    The e2m1 grid has step q = 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]; the code's mantissa bit is the parity of
    the multiple of q, so rounding ``a / q`` half-to-even (torch.round) is exactly ties-to-even on the code.
    """
    hi2 = a >= 2.0
    hi4 = a >= 4.0
    # a / q = a * 2 (a < 2), a (2 <= a < 4), a / 2 (a >= 4): all exact.
    m = torch.round(a * torch.where(hi4, 0.5, torch.where(hi2, 1.0, 2.0)))
    off = hi2.to(torch.uint8) + hi4.to(torch.uint8)
    return m.to(torch.uint8) + (off << 1)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a float tensor ``w [..., K]`` (K a multiple of 32) to MXFP4 ``(blocks, scales)``.

    Scale: per 32-block, the smallest exponent ``e`` with ``amax <= 6 * 2**e`` (i.e. ``ceil(log2(amax / 6))``,
    computed exactly), clamped to the e8m0 range ``[-127, 127]`` (stored ``e + 127`` in ``0..254``; 255 is NaN in
    e8m0 and never written).  An all-zero block gets exponent 0 (stored 127).  If the clamp at 127 bites, values
    saturate at ``+-6 * 2**127``.
    Values: ``w / 2**e`` is rounded to the nearest e2m1 value, **ties to even** (to the code with an even
    mantissa bit: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4).  The sign is kept, so negative values
    that round to zero become ``-0.0`` (code 8).
    Computation is in float32 (float64 inputs are first rounded to float32).  Non-finite inputs raise ValueError.
    Values already of the form ``FP4_E2M1_VALUES[c] * 2**s`` with one ``s`` per block round-trip exactly.
    """
    if not w.dtype.is_floating_point:
        raise TypeError(f"quantize_mxfp4 needs a floating-point tensor, got {w.dtype}")
    if w.dim() < 1:
        raise ValueError("quantize_mxfp4 needs a tensor with at least one dimension")
    k = w.shape[-1]
    if k % BLOCK_SIZE != 0:
        raise ValueError(f"quantize_mxfp4: last dimension ({k}) must be a multiple of {BLOCK_SIZE}")

    prefix = tuple(w.shape[:-1])
    groups = k // BLOCK_SIZE
    rows = math.prod(prefix) * groups
    blocks = torch.empty(rows, BLOCK_SIZE // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(rows, dtype=torch.uint8, device=w.device)
    flat = w.reshape(rows, BLOCK_SIZE)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        r1 = min(r0 + _ROWS_PER_CHUNK, rows)
        x = flat[r0:r1].to(torch.float32)
        amax = x.abs().amax(dim=1)  # NaN and inf propagate here
        if not bool(torch.isfinite(amax).all()):
            raise ValueError("quantize_mxfp4: input has non-finite values")
        e = _block_exponent(amax)
        scales[r0:r1] = (e + SCALE_BIAS).to(torch.uint8)

        # x / 2**e: a product with a power of two (2**-e is a normal or subnormal float32, exact); exact unless the
        # result is below 2**-126, where it rounds to code 0 anyway.
        a = x * torch.ldexp(torch.ones_like(amax), -e).unsqueeze(1)  # (not in place: x may be a view of w)
        neg = torch.signbit(a)
        a = a.abs_().clamp_(max=FP4_MAX)
        code = _e2m1_code(a)
        del a
        code |= neg.to(torch.uint8) << 3
        blocks[r0:r1] = code[:, 0::2] | (code[:, 1::2] << 4)
    return blocks.view(*prefix, groups, BLOCK_SIZE // 2), scales.view(*prefix, groups)
