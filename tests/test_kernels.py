"""The CPU kernels (model/kernels) against dequantise-then-matmul, on every instruction-set path this CPU runs.

Each result is checked against a float64 reference within the fp32 summation bound |error| <= K * 2^-23 * |x| |W|^T
(any summation order meets it; a wrong weight, scale, row or bias does not). Sizes are odd on purpose: rows not a
multiple of 8, odd output widths, K = 32 * odd, experts with 0, 1, a few and many rows (both the register-decode
path, <= 16 rows, and the decode-to-fp32-then-sgemm path, including weights too large for one scratch tile).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptoss.model import kernels
from gptoss.model.mxfp4 import dequantize_mxfp4

ROOT = Path(__file__).resolve().parents[1]


def _check(got, x, w, ends, bias=None):
    """got [N, M] vs float64 x[rows of e] @ w[e]^T (+ bias[e]) within the fp32 summation bound."""
    ref = torch.empty(got.shape, dtype=torch.float64)
    bound = torch.empty_like(ref)
    start = 0
    for e, end in enumerate(ends):
        xs, we = x[start:end].double(), w[e].double()
        ref[start:end] = xs @ we.t() + (bias[e].double() if bias is not None else 0)
        bound[start:end] = x.shape[1] * 2.0 ** -23 * (xs.abs() @ we.abs().t()) + 1e-30
        start = end
    err = (got.double() - ref).abs()
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, bound there {bound[err > bound].min()}"


def _mxfp4(experts, m, groups, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, m, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 131, (experts, m, groups), dtype=torch.uint8, generator=g)
    scales[0, 0, 0] = 0  # the smallest scale, 2^-127: subnormal weights
    return blocks, scales


GROUPS = [  # (rows per expert, output width M, blocks per row G)
    ([0, 1, 3, 0, 20], 7, 3),
    ([5, 0, 9, 1], 33, 5),  # 9 and 5 rows: the register-decode path in steps of four rows and a remainder
    ([1], 1, 1),
    ([2, 130], 130, 3),
    ([0, 0], 9, 1),  # no rows at all
    ([1, 4, 2], 17, 7),  # AVX-512 reads 4 blocks a step, AVX2 2: 7 leaves 3 (AVX-512) and 1 (AVX2) in natural order
    ([2, 3], 9, 8),  # whole steps only
    ([12, 1, 0, 40], 130, 97),  # sgemm path: 130 outputs x 3104 inputs cross decoded tiles (112 rows each)
]


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("counts, m, groups", GROUPS)
def test_mxfp4_grouped_mm(isa, counts, m, groups, with_bias):
    blocks, scales = _mxfp4(len(counts), m, groups, seed=m)
    x = torch.randn(sum(counts), groups * 32, generator=torch.Generator().manual_seed(1))
    ends = torch.tensor(counts).cumsum(0).tolist()
    bias = torch.randn(len(counts), m) if with_bias else None
    got = kernels.mxfp4_grouped_mm(x, blocks, scales, torch.tensor(ends, dtype=torch.int32), bias)
    _check(got, x, dequantize_mxfp4(blocks, scales), ends, bias)


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_every_item_is_computed_once_whatever_the_thread_count(isa, threads):
    """Threads start on contiguous shares of a call's items and take from each other's when theirs are done: with
    more threads than items, shares of one item, and uneven shares, every output is written once and right (an
    item computed twice would add its bias twice)."""
    counts, m, groups = [3, 0, 1, 40, 2], 300, 5  # 3 x 128-column items per expert with rows, both paths
    blocks, scales = _mxfp4(len(counts), m, groups, seed=7)
    x = torch.randn(sum(counts), groups * 32, generator=torch.Generator().manual_seed(2))
    ends = torch.tensor(counts).cumsum(0).tolist()
    bias = torch.randn(len(counts), m)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.mxfp4_grouped_mm(x, blocks, scales, torch.tensor(ends, dtype=torch.int32), bias)
        single = kernels.mxfp4_grouped_mm(x[:1], blocks[:1], scales[:1], torch.tensor([1], dtype=torch.int32),
                                          bias[:1])
    finally:
        torch.set_num_threads(before)
    _check(got, x, dequantize_mxfp4(blocks, scales), ends, bias)
    assert torch.equal(single[0], got[0])  # and a row's result does not depend on who computed it


@pytest.mark.parametrize("counts, m, k", [([0, 1, 4, 17], 13, 37), ([3], 130, 96), ([1, 0, 9], 5, 8)])
def test_bf16_grouped_mm(isa, counts, m, k):
    w = torch.randn(len(counts), m, k).bfloat16()
    x = torch.randn(sum(counts), k)
    ends = torch.tensor(counts).cumsum(0).tolist()
    bias = torch.randn(len(counts), m)
    got = kernels.bf16_grouped_mm(x, w, torch.tensor(ends, dtype=torch.int32), bias)
    _check(got, x, w.float(), ends, bias)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 13, 64])
@pytest.mark.parametrize("m, k", [(33, 100), (130, 64), (1, 7), (130, 1100), (37, 1700), (300, 100),
                                  (37, 1600), (300, 96)])  # K = 32 j: AMX tiles, a partial last tile of rows
def test_bf16_linear_matches_upcast_weights(isa, n, m, k):
    w = torch.randn(m, k).bfloat16()
    x = torch.randn(n, k)
    bias = torch.randn(m)
    _check(kernels.bf16_linear(x, w, bias), x, w.float()[None], [n], bias[None])
    _check(kernels.bf16_linear(x, w), x, w.float()[None], [n])


@pytest.mark.parametrize("k", [100, 1100, 1700])
def test_bf16_rows_do_not_depend_on_the_batch(isa, k):
    """Up to kDecodeRows (16) activation rows take the register path, whose kernels give each (weight row,
    activation row) pair the same arithmetic whatever the batch: AVX-512 streams weight rows for up to three rows
    and takes tiles of two and four weight rows beyond; AVX2 streams them for one row (two chains in registers)
    and takes tiles of four weight rows by up to three activation rows beyond (the same two chains, one pass each
    per block of 256 weights). So a row's outputs are bit for bit the same in any batch up to 16 (K with a tail
    that is not a whole step, shorter than a block or ending inside one; M not a multiple of 4)."""
    w = torch.randn(133, k).bfloat16()
    x = torch.randn(16, k)
    alone = torch.cat([kernels.bf16_linear(x[i:i + 1], w) for i in range(16)])
    for n in (2, 3, 4, 5, 8, 9, 16):
        assert torch.equal(kernels.bf16_linear(x[:n], w), alone[:n]), n


def test_mxfp4_weights_read_back_exactly_at_every_scale(isa):
    """One-hot activation rows read every weight back, one product each: every path decodes each code at each
    scale byte to exactly its value, extreme scales included (scale bytes 0 and 1 give subnormal factors; the amx
    path builds bf16 words directly for scales 2..252 and goes through fp32 outside them, and its tiles flush
    subnormal weights, below 2^-126, to zero). Scales up to 252: larger ones overflow fp32 for the biggest codes."""
    g = torch.Generator().manual_seed(7)
    groups, m = 12, 9
    blocks = torch.randint(0, 256, (1, m, groups, 16), dtype=torch.uint8, generator=g)
    choices = torch.tensor([0, 1, 2, 3, 64, 127, 128, 200, 251, 252], dtype=torch.uint8)
    scales = choices[torch.randint(0, len(choices), (1, m, groups), generator=g)]
    scales[0, 0, :4] = torch.tensor([2, 252, 3, 251], dtype=torch.uint8)  # a quad just inside the word range
    scales[0, 1, :4] = torch.tensor([1, 100, 100, 100], dtype=torch.uint8)  # one scale outside it
    k = groups * 32
    ends = lambda n: torch.tensor([n], dtype=torch.int32)  # noqa: E731
    want = dequantize_mxfp4(blocks[0], scales[0]).float().reshape(m, k).T
    # up to 16 rows: the register decode (no flush); all k rows at once: the many-rows path
    few = torch.cat([kernels.mxfp4_grouped_mm(torch.eye(k)[r:r + 16], blocks, scales, ends(16))
                     for r in range(0, k, 16)])
    assert torch.equal(few, want)
    out = kernels.mxfp4_grouped_mm(torch.eye(k), blocks, scales, ends(k))
    if isa == "amx":
        want = torch.where(want.abs() < 2.0 ** -126, torch.zeros_like(want), want)
    assert torch.equal(out, want)


def test_mxfp4_rows_do_not_depend_on_the_batch(isa):
    """The same for the MXFP4 register path: one expert's rows, alone or in batches up to 16 (an odd number of
    blocks, so the last one takes the natural-order tail)."""
    blocks, scales = _mxfp4(1, 37, 7, seed=3)
    x = torch.randn(16, 7 * 32)
    ends = lambda n: torch.tensor([n], dtype=torch.int32)  # noqa: E731
    alone = torch.cat([kernels.mxfp4_grouped_mm(x[i:i + 1], blocks, scales, ends(1)) for i in range(16)])
    for n in (2, 3, 4, 5, 8, 9, 16):
        assert torch.equal(kernels.mxfp4_grouped_mm(x[:n], blocks, scales, ends(n)), alone[:n]), n


def test_set_sgemm_refuses_what_it_cannot_do(isa):
    with pytest.raises(RuntimeError, match="expected own, mkl or auto"):
        kernels.set_sgemm("blas")
    if isa == "scalar":
        with pytest.raises(RuntimeError, match="only the AVX-512 and AVX2 paths have their own"):
            kernels.set_sgemm("own")
    kernels.set_sgemm("mkl")
    assert kernels.sgemm() == "mkl"


def test_many_rows_do_not_depend_on_the_batch_on_the_own_sgemm(isa):
    """The own sgemms (AVX-512, AVX2) sum each (activation row, weight row) pair in k order whatever the number of
    rows, so beyond the register path too (MXFP4 experts take it from 25 rows on there) a row's outputs are the same
    bit for bit in any batch: rows padded inside a vector of 16 (AVX-512: one to three vectors a block, K across
    chunks of 128 with a tail; AVX2: panels of 16 rows, 37 weight rows in blocks of six and a tail)."""
    if kernels.sgemm() != "own":
        pytest.skip(f"the many-rows product is {kernels.sgemm()}'s here")
    blocks, scales = _mxfp4(1, 37, 7, seed=5)
    x = torch.randn(80, 7 * 32)
    ends = lambda n: torch.tensor([n], dtype=torch.int32)  # noqa: E731
    first = kernels.mxfp4_grouped_mm(x[:25], blocks, scales, ends(25))
    for n in (32, 33, 48, 49, 80):
        assert torch.equal(kernels.mxfp4_grouped_mm(x[:n], blocks, scales, ends(n))[:25], first), n


@pytest.mark.parametrize("tokens, top_k, experts, hidden, inter, pad, scale", [
    (1, 4, 32, 64, 48, (0, 16), 1),    # decode row; down's input on a 64-column grid
    (3, 2, 5, 96, 40, (8, 16), 1),     # a tensor-parallel slice inside a block: zero columns before and after
    (37, 4, 6, 64, 32, (0, 0), 1),     # many rows per expert: the sgemm path
    (9, 2, 3, 64, 44, (0, 20), 300),   # gates far outside the clamp and e^x's range; 44 = 5 vectors + a tail
])
def test_mxfp4_moe_equals_the_op_by_op_layer(isa, tokens, top_k, experts, hidden, inter, pad, scale):
    """The fused layer (one call) against the same layer through the separate ops (sort, gather, grouped
    matmuls, clamped SwiGLU, weighted index_add)."""
    from gptoss.model.ops import torch_ops
    from gptoss.model.weights import PackedMxfp4
    g = torch.Generator().manual_seed(tokens * 100 + experts)
    gu_blocks, gu_scales = _mxfp4(experts, 2 * inter, hidden // 32, seed=1)
    dn_blocks, dn_scales = _mxfp4(experts, hidden, (pad[0] + inter + pad[1]) // 32, seed=2)
    gu_scales.clamp_(min=120), dn_scales.clamp_(min=120)
    gate_up = PackedMxfp4(gu_blocks, gu_scales, (0, 0))
    down = PackedMxfp4(dn_blocks, dn_scales, pad)
    gu_bias, dn_bias = torch.randn(experts, 2 * inter, generator=g), torch.randn(experts, hidden, generator=g)
    x = torch.randn(tokens, hidden, generator=g) * scale
    chosen = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1)

    fused = kernels.mxfp4_moe(x, weights, chosen, gu_blocks, gu_scales, gu_bias, dn_blocks, dn_scales, dn_bias,
                              pad[0], 1.702, 7.0)
    separate = torch_ops.moe_by_ops(x, weights, chosen, gate_up, gu_bias, down, dn_bias, 1.702, 7.0)
    assert fused.shape == separate.shape == x.shape
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5 * separate.abs().max().item())


def _moe_weights(experts, hidden, inter, seed):
    gu_blocks, gu_scales = _mxfp4(experts, 2 * inter, hidden // 32, seed=seed)
    dn_blocks, dn_scales = _mxfp4(experts, hidden, inter // 32, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    return (gu_blocks, gu_scales.clamp(min=120), torch.randn(experts, 2 * inter, generator=g),
            dn_blocks, dn_scales.clamp(min=120), torch.randn(experts, hidden, generator=g))


@pytest.mark.parametrize("tokens, top_k, experts", [(1, 4, 32), (5, 2, 6), (40, 4, 8)])
def test_mxfp4_moe_routed_equals_route_then_moe(isa, tokens, top_k, experts):
    """The layer with its router in the call against the router op by op (bf16 linear, topk, softmax) then the
    experts' kernel: the same experts in the same order, weights equal to rounding."""
    from gptoss.model.ops import torch_ops
    hidden, inter = 64, 64
    layer = _moe_weights(experts, hidden, inter, seed=tokens)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, hidden, generator=g)
    router_w, router_b = torch.randn(experts, hidden, generator=g).bfloat16(), torch.randn(experts, generator=g)
    weights, chosen = torch_ops.route(x, router_w, router_b, top_k)
    separate = kernels.mxfp4_moe(x, weights, chosen, *layer, 0, 1.702, 7.0)
    fused = kernels.mxfp4_moe_routed(x, router_w, router_b, top_k, *layer, 0, 1.702, 7.0)
    torch.testing.assert_close(fused, separate, rtol=1e-6, atol=1e-6 * separate.abs().max().item())


def test_mxfp4_moe_routed_breaks_ties_toward_the_lower_expert():
    layer = _moe_weights(4, 64, 64, seed=3)
    x = torch.zeros(1, 64)  # logits = the bias: experts 1 and 2 tie for the top
    router_w, router_b = torch.zeros(4, 64).bfloat16(), torch.tensor([0.0, 2.0, 2.0, 1.0])
    fused = kernels.mxfp4_moe_routed(x, router_w, router_b, 1, *layer, 0, 1.702, 7.0)
    expected = kernels.mxfp4_moe(x, torch.ones(1, 1), torch.tensor([[1]]), *layer, 0, 1.702, 7.0)
    assert torch.equal(fused, expected)
    with pytest.raises(RuntimeError, match=r"top_k 5 outside \[1, 4\]"):
        kernels.mxfp4_moe_routed(x, router_w, router_b, 5, *layer, 0, 1.702, 7.0)
    with pytest.raises(RuntimeError, match=r"router_weight must be \[4, H\]"):
        kernels.mxfp4_moe_routed(x, router_w[:3], router_b, 1, *layer, 0, 1.702, 7.0)


def test_strided_activation_is_accepted():
    w = torch.randn(9, 64).bfloat16()
    x = torch.randn(64, 5).t()  # not contiguous
    _check(kernels.bf16_linear(x, w), x.contiguous(), w.float()[None], [5])


def test_bad_inputs_are_refused_with_the_problem_named():
    blocks, scales = _mxfp4(2, 4, 2, seed=0)
    offs = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="x has 32 columns, the weights take 64"):
        kernels.mxfp4_grouped_mm(torch.randn(2, 32), blocks, scales, offs)
    with pytest.raises(RuntimeError, match=r"scales must be contiguous uint8 \[E, M, K/32\]"):
        kernels.mxfp4_grouped_mm(torch.randn(2, 64), blocks, scales[:, :, :1], offs)
    with pytest.raises(RuntimeError, match="offs must be non-decreasing row ends"):
        kernels.mxfp4_grouped_mm(torch.randn(2, 64), blocks, scales, torch.tensor([2, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="x must be a 2-d float32"):
        kernels.bf16_linear(torch.randn(2, 8).double(), torch.randn(3, 8).bfloat16())
    with pytest.raises(RuntimeError, match="is not available on this CPU"):
        kernels.set_isa("avx9000")


def test_fake_implementations_give_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(5, 64)
        out = torch.ops.gptoss.mxfp4_grouped_mm(x, torch.empty(3, 7, 2, 16, dtype=torch.uint8),
                                                torch.empty(3, 7, 2, dtype=torch.uint8),
                                                torch.empty(3, dtype=torch.int32), None)
        assert out.shape == (5, 7)
        assert torch.ops.gptoss.bf16_linear(x, torch.empty(11, 64, dtype=torch.bfloat16)).shape == (5, 11)


def _op_samples():
    """(op, args) for every gptoss op, at a decode step's shapes and a few rows more."""
    blocks, scales = _mxfp4(3, 40, 2, seed=5)
    layer = _moe_weights(8, 64, 64, seed=3)
    router_w, router_b = torch.randn(8, 64).bfloat16(), torch.randn(8)
    cache = torch.randn(2, 24, 2, 64)
    ops = torch.ops.gptoss
    for n in (1, 5):
        x = torch.randn(n, 64)
        yield ops.mxfp4_grouped_mm.default, (x, blocks, scales, torch.tensor([n, n, n], dtype=torch.int32),
                                             torch.randn(3, 40))
        yield ops.bf16_grouped_mm.default, (x, torch.randn(2, 11, 64).bfloat16(),
                                            torch.tensor([0, n], dtype=torch.int32), None)
        yield ops.bf16_linear.default, (x, torch.randn(11, 64).bfloat16(), torch.randn(11))
        weights, chosen = torch.full((n, 2), 0.5), torch.stack([torch.randperm(8)[:2] for _ in range(n)])
        yield ops.mxfp4_moe.default, (x, weights, chosen, *layer, 0, 1.702, 7.0)
        yield ops.mxfp4_moe_routed.default, (x, router_w, router_b, 2, *layer, 0, 1.702, 7.0)
    q = torch.randn(2, 1, 8, 64)
    k_pos = torch.arange(24).repeat(2, 1)
    yield ops.decode_attention.default, (q, cache, cache.clone(), torch.randn(8), k_pos,
                                         torch.tensor([[23], [10]]), 0, 0.125)
    yield ops.prefill_attention.default, (torch.randn(2, 5, 8, 64), cache, cache.clone(), torch.randn(8), k_pos,
                                          torch.tensor([[19], [6]]) + torch.arange(5), 0, 0.125)


def test_fake_implementations_match_the_kernels():
    """Every op's fake implementation gives the sizes, strides and dtype its kernel returns (torch.library.opcheck):
    the compiled graphs rely on them without checking each call (graph/inductor.py turns size asserts off)."""
    for op, args in _op_samples():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _isa_in_subprocess(value: str) -> subprocess.CompletedProcess:
    code = "from gptoss.model import kernels; print(kernels.isa())"
    env = dict(os.environ, GPTOSS_CPU_ISA=value, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_env_var_forces_a_lower_path():
    lower = kernels.available_isas()[-1]  # 'scalar' always exists
    proc = _isa_in_subprocess(lower)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == lower
    proc = _isa_in_subprocess("avx9000")
    assert proc.returncode != 0 and "GPTOSS_CPU_ISA='avx9000' is not available on this CPU" in proc.stderr


def test_fma_rates_name_the_vector_widths_this_cpu_runs():
    """The benchmarks' machine probe: a positive rate for each width the CPU runs, and none for the others."""
    rates = kernels.fma_rates()
    isas = kernels.available_isas()
    assert set(rates) <= {"avx2", "avx512"}
    assert ("avx2" in rates) == ("avx2" in isas)
    if "avx512" in isas:
        assert "avx512" in rates
    # two to hundreds of multiply-adds per ns on any core with FMA units: a broken loop would read 0 or inf
    assert all(1.0 < rate < 1000.0 for rate in rates.values()), rates


def test_prefetch_distance_changes_speed_not_results():
    blocks, scales = _mxfp4(2, 33, 5, seed=3)
    x = torch.randn(6, 5 * 32)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    w = torch.randn(17, 96).bfloat16()
    xb = torch.randn(3, 96)
    before = kernels.prefetch()
    try:
        outs = []
        for distance in (0, 8192):
            kernels.set_prefetch(mxfp4=distance, bf16=distance)
            assert kernels.prefetch() == {"mxfp4": distance, "bf16": distance}
            outs.append((kernels.mxfp4_grouped_mm(x, blocks, scales, offs), kernels.bf16_linear(xb, w)))
        assert all(torch.equal(a, b) for a, b in zip(*outs))
    finally:
        kernels.set_prefetch(**before)


def test_tune_prefetch_keeps_the_fastest_candidate(isa):
    """Only the kernels whose loops read a distance on this path are timed; the others keep their values."""
    timed = {"amx": {"mxfp4", "bf16"}, "avx512": {"mxfp4", "bf16"}, "avx2": {"mxfp4"}, "scalar": set()}[isa]
    before = kernels.prefetch()
    try:
        table = kernels.tune_prefetch(candidates=(0, 1024, 4096), footprint_mb=4, rounds=1)
        chosen = kernels.prefetch()
        assert set(table) == timed
        for name in ("mxfp4", "bf16"):
            if name in timed:
                assert set(table[name]) == {0, 1024, 4096} and all(v > 0 for v in table[name].values())
                assert chosen[name] == max(table[name], key=table[name].get)
            else:
                assert chosen[name] == before[name]
    finally:
        kernels.set_prefetch(**before)


def test_bad_prefetch_distance_is_refused():
    with pytest.raises(RuntimeError, match="prefetch distances must lie in"):
        kernels.set_prefetch(mxfp4=-1)


def _prefetch_in_subprocess(value: str) -> subprocess.CompletedProcess:
    code = "from gptoss.model import kernels; print(kernels.prefetch())"
    env = dict(os.environ, GPTOSS_PREFETCH=value, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_env_var_sets_the_prefetch_distances():
    proc = _prefetch_in_subprocess("mxfp4=1024,bf16=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str({"mxfp4": 1024, "bf16": 0})
    proc = _prefetch_in_subprocess("mxfp4=lots")
    assert proc.returncode != 0 and "GPTOSS_PREFETCH='mxfp4=lots'" in proc.stderr


def test_loading_the_library_makes_the_cpp_kernels_the_ops_cpu_implementations():
    """Before the library loads, the ops run a Python implementation that loads it; after, the dispatcher calls the
    C++ kernels directly (a call no longer passes through Python), with the same results."""
    code = """
import torch
from gptoss.model import kernels
names = ("bf16_linear", "bf16_grouped_mm", "mxfp4_grouped_mm", "mxfp4_moe", "mxfp4_moe_routed", "decode_attention",
         "prefill_attention")
has_cpu = lambda: [torch._C._dispatch_has_kernel_for_dispatch_key(f"gptoss::{n}", "CPU") for n in names]
print(has_cpu())
x, w = torch.randn(3, 64), torch.randn(5, 64).bfloat16()
first = kernels.bf16_linear(x, w)
print(has_cpu())
print(torch.equal(first, kernels.bf16_linear(x, w)), torch.equal(first, kernels.extension().bf16_linear(x, w, None)))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:3] == [str([False] * 7), str([True] * 7), "True True"]


def _build_tiny(name: str, source, root) -> int:
    """build_library on a tiny library (no torch headers, seconds) in a fresh process, under build root `root`;
    the value its function returns."""
    code = ("import ctypes; from gptoss.model import kernels; "
            f"kernels.build_library({name!r}, [{str(source)!r}], python_module=False); "
            f"print(ctypes.CDLL({str(root / 'gptoss' / name / (name + '.so'))!r}).gptoss_tiny())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


def test_a_build_killed_midway_does_not_hang_the_next(tmp_path):
    """torch's builder leaves a marker file when its process is killed mid-build, and its later callers wait on it
    forever; build_library clears a marker no live build holds."""
    name = "gptoss_tiny_test"
    source = tmp_path / "tiny.cpp"
    source.write_text('extern "C" int gptoss_tiny() { return 7; }\n')
    directory = tmp_path / "gptoss" / name
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")  # what a killed build leaves
    assert _build_tiny(name, source, tmp_path) == 7


def test_a_second_checkout_of_the_same_sources_loads_the_build(tmp_path):
    """The same sources at another path (a second checkout) load the cached library: ninja would rebuild it if
    the compile commands named the callers' paths, so they name a copy in the build directory."""
    name = "gptoss_tiny_copies"
    built = []
    for checkout in (tmp_path / "one", tmp_path / "two"):
        checkout.mkdir()
        (checkout / "tiny.h").write_text("#define SEVEN 7\n")
        (checkout / "tiny.cpp").write_text('#include "tiny.h"\nextern "C" int gptoss_tiny() { return SEVEN; }\n')
        assert _build_tiny(name, checkout / "tiny.cpp", tmp_path) == 7
        built.append((tmp_path / "gptoss" / name / f"{name}.so").stat().st_mtime_ns)
    assert built[0] == built[1]  # the second checkout compiled nothing

