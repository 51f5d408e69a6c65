"""MXFP4 codec: decoder bit-exact against transformers, encoder exact/nearest with ties to even."""

import math

import pytest
import torch

from gptoss.model import mxfp4
from gptoss.model.mxfp4 import FP4_E2M1_VALUES, dequantize_mxfp4, quantize_mxfp4

tf_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def _transformers_dequant(blocks, scales, dtype):
    # transformers returns [E, in, out] (it transposes dims 1 and 2); undo that to compare with [E, out, in].
    return tf_mxfp4.convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype).transpose(1, 2)


def test_lut_matches_transformers():
    assert list(FP4_E2M1_VALUES) == list(tf_mxfp4.FP4_VALUES)
    assert [math.copysign(1.0, v) for v in FP4_E2M1_VALUES] == [math.copysign(1.0, v) for v in tf_mxfp4.FP4_VALUES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 4), (4, 96, 2), (2, 64, 90), (8, 3, 7)])
def test_dequantize_bit_exact_vs_transformers(shape, dtype):
    g = torch.Generator().manual_seed(hash(shape) % 1000 + (dtype == torch.bfloat16))
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 151, shape, dtype=torch.uint8, generator=g)
    ours = dequantize_mxfp4(blocks, scales, dtype=dtype)
    ref = _transformers_dequant(blocks, scales, dtype)
    assert ours.shape == (*shape[:-1], shape[-1] * 32) == ref.shape
    assert ours.dtype == dtype
    assert torch.equal(_bits(ours), _bits(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_every_byte_and_scale_vs_transformers(dtype):
    # All 256 byte values under every finite e8m0 scale (0..254), including fp32/bf16 subnormal results.
    n_scales = 255
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 1, 16, 16).expand(1, n_scales, 16, 16)
    blocks = blocks.contiguous()
    scales = torch.arange(n_scales, dtype=torch.int32).to(torch.uint8).reshape(1, n_scales, 1).expand(1, n_scales, 16)
    scales = scales.contiguous()
    ours = dequantize_mxfp4(blocks, scales, dtype=dtype)
    ref = _transformers_dequant(blocks, scales, dtype)
    assert torch.equal(_bits(ours), _bits(ref))


def test_dequantize_semantics_pure_python():
    g = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 256, (3, 16), dtype=torch.uint8, generator=g)
    scales = torch.tensor([127, 120, 140], dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, scales)  # 2-D input: no expert dim
    assert out.shape == (96,)
    for b in range(3):
        for j in range(32):
            byte = int(blocks[b, j // 2])
            nib = byte & 0xF if j % 2 == 0 else byte >> 4
            want = math.ldexp(FP4_E2M1_VALUES[nib], int(scales[b]) - 127)
            assert out[b * 32 + j].item() == want


def test_dequantize_does_not_transpose_and_chunks(monkeypatch):
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (2, 5, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (2, 5, 3), dtype=torch.uint8, generator=g)
    full = dequantize_mxfp4(blocks, scales)
    assert full.shape == (2, 5, 96)
    # Row r of the [E, out, in] result only depends on row r of the input.
    assert torch.equal(full[1, 4], dequantize_mxfp4(blocks[1, 4], scales[1, 4]))
    monkeypatch.setattr(mxfp4, "_ROWS_PER_CHUNK", 7)  # 30 rows -> 5 chunks, the last partial
    assert torch.equal(dequantize_mxfp4(blocks, scales), full)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16), full.to(torch.bfloat16))


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError):
        dequantize_mxfp4(torch.zeros(2, 3, 8, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        dequantize_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(TypeError):
        dequantize_mxfp4(torch.zeros(2, 3, 16), torch.zeros(2, 3, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------- quantize


def _reference_quantize(w: torch.Tensor):
    """Brute force, float64: per block the smallest e with amax <= 6 * 2**e; nearest value, ties to even code."""
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    rows = w.reshape(-1, 32).double().tolist()
    codes, exps = [], []
    for row in rows:
        amax = max(abs(v) for v in row)
        if amax == 0:
            e = 0
        else:
            e = -200
            while amax > 6.0 * 2.0**e:
                e += 1
            e = max(-127, min(127, e))
        exps.append(e + 127)
        row_codes = []
        for v in row:
            a = abs(v) / 2.0**e
            dist = [abs(a - m) for m in mags]
            best = min(dist)
            cands = [i for i, d in enumerate(dist) if d == best]
            c = cands[0] if len(cands) == 1 else next(i for i in cands if i % 2 == 0)
            row_codes.append(c | (8 if math.copysign(1.0, v) < 0 else 0))
        codes.append(row_codes)
    return torch.tensor(codes, dtype=torch.uint8), torch.tensor(exps, dtype=torch.uint8)


def _codes(blocks: torch.Tensor) -> torch.Tensor:
    b = blocks.reshape(-1, 16)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1, 32)


def test_quantize_matches_brute_force_reference():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(6, 4, 64, generator=g) * torch.logspace(-3, 3, 6).reshape(6, 1, 1)
    w[0, 0, :32] = 0.0  # an all-zero block
    w[0, 1, :32] = -0.0
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (6, 4, 2, 16) and blocks.dtype == torch.uint8
    assert scales.shape == (6, 4, 2) and scales.dtype == torch.uint8
    ref_codes, ref_scales = _reference_quantize(w)
    assert torch.equal(scales.reshape(-1), ref_scales)
    assert torch.equal(_codes(blocks), ref_codes)
    assert scales[0, 0, 0] == 127


def test_quantize_ties_to_even():
    # With a 6.0 in the block the exponent is 0, so these values are exactly the ties of the e2m1 grid.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = torch.zeros(32)
    row[0] = 6.0
    row[1 : 1 + len(ties)] = torch.tensor(ties)
    row[8 : 8 + len(ties)] = -torch.tensor(ties)
    blocks, scales = quantize_mxfp4(row)
    assert scales.tolist() == [127]
    out = dequantize_mxfp4(blocks, scales)
    assert out[1 : 1 + len(ties)].tolist() == want
    assert out[8 : 8 + len(ties)].tolist() == [-v for v in want]
    assert math.copysign(1.0, out[8].item()) == -1.0  # -0.25 rounds to -0.0


def test_quantize_round_trip_exact_for_representable_values():
    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (4, 24, 6, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 151, (4, 24, 6), dtype=torch.uint8, generator=g)
    w = dequantize_mxfp4(blocks, scales)
    b2, s2 = quantize_mxfp4(w)
    assert torch.equal(dequantize_mxfp4(b2, s2), w)
    # The same holds from bf16 input (the values are bf16-representable) and for the bf16 decode.
    b3, s3 = quantize_mxfp4(w.to(torch.bfloat16))
    assert torch.equal(b3, b2) and torch.equal(s3, s2)
    assert torch.equal(dequantize_mxfp4(b3, s3, torch.bfloat16), w.to(torch.bfloat16))
    # Blocks whose largest magnitude is 6 (code 7) come back byte for byte.
    blocks = blocks.clone()
    blocks[..., 0] = (blocks[..., 0] & 0xF0) | 0x7
    b4, s4 = quantize_mxfp4(dequantize_mxfp4(blocks, scales))
    assert torch.equal(s4, scales)
    assert torch.equal(dequantize_mxfp4(b4, s4), dequantize_mxfp4(blocks, scales))


def test_quantize_error_bounded_for_normals():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 128, 256, generator=g)
    w_in = w.clone()
    blocks, scales = quantize_mxfp4(w)
    assert torch.equal(w, w_in)  # input untouched
    q = dequantize_mxfp4(blocks, scales)
    step = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127).repeat_interleave(32, dim=-1)
    amax = w.reshape(8, 128, 8, 32).abs().amax(-1).repeat_interleave(32, dim=-1)
    assert bool((amax <= 6 * step).all()) and bool((amax > 3 * step).all())  # smallest exponent that fits
    err = (q - w).abs()
    assert bool((err <= step).all())  # half the widest gap (2 between 4 and 6) times the block scale
    rel = ((q - w).norm() / w.norm()).item()
    assert rel < 0.15, rel
    assert bool((q.sign() * w.sign() >= 0).all())


def test_quantize_extreme_and_invalid_inputs():
    tiny = torch.full((2, 32), 2.0**-128)  # float32 subnormals: the exponent clamps to -127
    tiny[1] = 1e-40
    blocks, scales = quantize_mxfp4(tiny)
    assert scales.tolist() == [[0], [0]]
    out = dequantize_mxfp4(blocks, scales)
    assert torch.equal(out[0], tiny[0])  # 0.5 * 2**-127
    assert torch.equal(out[1], torch.zeros(32))  # below a quarter of the smallest step
    big = torch.full((2, 32), 1.0e38)
    big[1] *= -1
    b, s = quantize_mxfp4(big)
    assert s.max() <= 254
    assert torch.allclose(dequantize_mxfp4(b, s), big, rtol=0.25)
    for bad in (float("nan"), float("inf")):
        w = torch.zeros(32)
        w[3] = bad
        with pytest.raises(ValueError):
            quantize_mxfp4(w)
    with pytest.raises(TypeError):
        quantize_mxfp4(torch.zeros(32, dtype=torch.int32))


@pytest.mark.parametrize("k", [1, 16, 31, 33, 48, 100])
def test_quantize_rejects_non_multiple_of_32(k):
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.randn(4, k))


def test_quantize_chunked_equals_unchunked(monkeypatch):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 10, 96, generator=g)
    ref = quantize_mxfp4(w)
    monkeypatch.setattr(mxfp4, "_ROWS_PER_CHUNK", 7)
    out = quantize_mxfp4(w)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
