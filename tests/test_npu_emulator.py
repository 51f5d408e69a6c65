"""Each emulated torch_npu op against an independent computation (numpy loops written from the op's documentation),
with an edge case per op, and calls outside the documented semantics refused."""
import math

import numpy as np
import pytest
import torch

from npu_emulator import MASK_SIZE, EmulatorError, TorchairEmulator, _attention_rows, make_torch_npu


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def npu():
    return make_torch_npu()


def _np(t):
    return t.detach().double().numpy()


def _rms(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


# -- norms ----------------------------------------------------------------------------------------------------------
def test_rms_norm(npu):
    torch.manual_seed(0)
    x, g = torch.randn(3, 5, 32), torch.randn(32)
    y, rstd = npu.npu_rms_norm(x, g, epsilon=1e-5)
    np.testing.assert_allclose(_np(y), _rms(_np(x), _np(g), 1e-5), rtol=1e-5, atol=1e-6)
    assert rstd.shape == (3, 5, 1) and rstd.dtype == torch.float32
    # edge: bf16 input with an fp32 gamma (a documented pair) keeps the input dtype; an undocumented pair is refused
    yb, _ = npu.npu_rms_norm(x.bfloat16(), g, epsilon=1e-5)
    assert yb.dtype == torch.bfloat16
    with pytest.raises(EmulatorError):
        npu.npu_rms_norm(x.bfloat16(), g.half())


def test_add_rms_norm(npu):
    torch.manual_seed(1)
    a, b, g = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    y, rstd, s = npu.npu_add_rms_norm(a, b, g, epsilon=1e-6)
    np.testing.assert_array_equal(s.numpy(), (a + b).numpy())  # xOut is x1 + x2
    np.testing.assert_allclose(_np(y), _rms(_np(a) + _np(b), _np(g), 1e-6), rtol=1e-5, atol=1e-6)
    assert rstd.shape == (4, 1)
    with pytest.raises(EmulatorError):  # gamma must have x1's dtype
        npu.npu_add_rms_norm(a, b, g.double())


# -- scatter_update_ ------------------------------------------------------------------------------------------------
def test_scatter_update_(npu):
    torch.manual_seed(2)
    data = torch.zeros(3, 10, 2, 4)
    upd = torch.randn(3, 3, 2, 4)
    idx = torch.tensor([0, 3, 7])  # edge: row 2 fills the buffer up to its last slot
    expected = _np(data).copy()
    for b, s in enumerate(idx.tolist()):
        for t in range(3):
            expected[b, s + t] = _np(upd)[b, t]
    out = npu.scatter_update_(data, idx, upd, 1)
    assert out is data
    np.testing.assert_array_equal(_np(data), expected)
    npu.scatter_update_(data, idx.int(), upd, -3)  # int32 indices and a negative axis are documented
    with pytest.raises(EmulatorError, match="outside"):
        npu.scatter_update_(data, torch.tensor([0, 3, 8]), upd, 1)
    with pytest.raises(EmulatorError):
        npu.scatter_update_(data, idx, upd, 0)


# -- FIA v2 ---------------------------------------------------------------------------------------------------------
def _fia_reference(q, keys, values, sinks, qlens, kvlens, scale, window):
    """Per row and per query: keys at positions 0..kvlen-1, the query at position kvlen - qlen + i (it is the last
    qlen tokens of its row); visible keys: position <= the query's, and > position - window when window > 0."""
    q, sinks = _np(q), _np(sinks)
    hq = q.shape[1]
    out = np.zeros_like(q)
    t0 = 0
    for b, (ql, kl) in enumerate(zip(qlens, kvlens)):
        k, v = _np(keys[b][:kl]), _np(values[b][:kl])
        group = hq // k.shape[1]
        for i in range(ql):
            pos = kl - ql + i
            for h in range(hq):
                logits = [q[t0 + i, h] @ k[j, h // group] * scale for j in range(kl)
                          if j <= pos and (window == 0 or j > pos - window)]
                cols = [j for j in range(kl) if j <= pos and (window == 0 or j > pos - window)]
                m = max(logits + [sinks[h]])
                e = np.exp(np.array(logits) - m)
                denom = e.sum() + math.exp(sinks[h] - m)
                out[t0 + i, h] = (e[:, None] * v[cols, h // group]).sum(0) / denom
        t0 += ql
    return out


BF16 = dict(rtol=8e-3, atol=8e-3)  # FIA in TND is bf16-only: outputs are rounded to bf16 (2**-8 relative)


def _bf(*tensors):
    return [t.bfloat16() for t in tensors]


def _paged(batch, slots, kv_heads, dim, kvlens, order):
    """Per-row key/value [slots, Hkv, D] and their pages (blocknum, 128, Hkv*D) under a permuted block table;
    slots past each row's length hold NaN: nothing past actual_seq_kvlen may be read (partially filled block)."""
    torch.manual_seed(3)
    rows_k = [torch.randn(slots, kv_heads, dim) for _ in range(batch)]
    rows_v = [torch.randn(slots, kv_heads, dim) for _ in range(batch)]
    per_row = slots // 128
    key = torch.empty(batch * per_row, 128, kv_heads * dim)
    value = torch.empty_like(key)
    table = torch.tensor(order, dtype=torch.int32).view(batch, per_row)
    for b in range(batch):
        rows_k[b][kvlens[b]:] = float("nan")
        rows_v[b][kvlens[b]:] = float("nan")
        for j in range(per_row):
            key[table[b, j]] = rows_k[b][j * 128:(j + 1) * 128].reshape(128, -1)
            value[table[b, j]] = rows_v[b][j * 128:(j + 1) * 128].reshape(128, -1)
    return rows_k, rows_v, key.bfloat16(), value.bfloat16(), table


MASK = ~torch.tril(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool))


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("qlens", [[8, 8], [1, 1]], ids=["prefill", "decode"])
def test_fia_v2_paged_tnd(npu, window, qlens):
    hq, hkv, dim, slots = 4, 2, 16, 256
    kvlens = [13, 200] if qlens[0] > 1 else [1, 129]  # 129: one slot into the second (partially filled) block
    rows_k, rows_v, key, value, table = _paged(2, slots, hkv, dim, kvlens, order=[3, 0, 1, 2])
    rows_k, rows_v = [r.bfloat16() for r in rows_k], [r.bfloat16() for r in rows_v]
    q, sinks = _bf(torch.randn(sum(qlens), hq, dim), torch.randn(hq))
    out, _ = npu.npu_fused_infer_attention_score_v2(
        q, key, value, atten_mask=MASK, actual_seq_qlen=np.cumsum(qlens).tolist(), actual_seq_kvlen=kvlens,
        block_table=table, learnable_sink=sinks, num_query_heads=hq, num_key_value_heads=hkv, softmax_scale=0.25,
        pre_tokens=window - 1 if window else 2**31 - 1, next_tokens=0, input_layout="TND",
        sparse_mode=4 if window else 3, block_size=128)
    assert out.shape == q.shape and torch.isfinite(out).all()
    np.testing.assert_allclose(_np(out), _fia_reference(q, rows_k, rows_v, sinks, qlens, kvlens, 0.25, window),
                               **BF16)


def test_fia_v2_band_boundary(npu):
    """sparse_mode=4 keeps keys diag-pre_tokens .. diag+next_tokens (the documented band golden): with pre_tokens=3
    the key 3 before the query counts, the one 4 before does not."""
    hq = hkv = 1
    dim, kvlen = 16, 20
    k = torch.zeros(kvlen, hkv, dim)
    v = torch.zeros(kvlen, hkv, dim)
    v[19 - 3, 0, 0] = 1.0  # inside the band of the last query
    v[19 - 4, 0, 1] = 1.0  # just outside
    q, k, v = _bf(torch.zeros(1, hq, dim), k, v)
    out, _ = npu.npu_fused_infer_attention_score_v2(
        q, k, v, atten_mask=MASK, actual_seq_qlen=[1], actual_seq_kvlen=[kvlen], num_query_heads=1,
        pre_tokens=3, next_tokens=0, input_layout="TND", sparse_mode=4)
    assert float(out[0, 0, 0]) == pytest.approx(1 / 4) and float(out[0, 0, 1]) == 0  # 4 equal keys: diag-3 .. diag


def test_fia_v2_unpaged_tnd_cumulative(npu):
    torch.manual_seed(4)
    qlens, kvlens = [3, 5], [3, 5]
    q, k, v, sinks = _bf(torch.randn(8, 2, 16), torch.randn(8, 1, 16), torch.randn(8, 1, 16), torch.randn(2))
    out, _ = npu.npu_fused_infer_attention_score_v2(
        q, k, v, atten_mask=MASK, actual_seq_qlen=[3, 8], actual_seq_kvlen=[3, 8], learnable_sink=sinks,
        num_query_heads=2, num_key_value_heads=1, softmax_scale=0.3, next_tokens=0, input_layout="TND",
        sparse_mode=3)
    ref = _fia_reference(q, [k[:3], k[3:]], [v[:3], v[3:]], sinks, qlens, kvlens, 0.3, 0)
    np.testing.assert_allclose(_np(out), ref, **BF16)


def test_fia_v2_refuses_misuse(npu):
    _, _, key, value, table = _paged(2, 256, 2, 16, [100, 100], order=[0, 1, 2, 3])
    q = torch.randn(16, 4, 16).bfloat16()
    base = dict(atten_mask=MASK, actual_seq_qlen=[8, 16], actual_seq_kvlen=[200, 100], block_table=table,
                learnable_sink=torch.randn(4).bfloat16(), num_query_heads=4, num_key_value_heads=2, softmax_scale=0.25,
                next_tokens=0, input_layout="TND", sparse_mode=3, block_size=128)

    def call(**kw):
        return npu.npu_fused_infer_attention_score_v2(q, key, value, **{**base, **kw})

    call()
    with pytest.raises(EmulatorError, match="exceeds"):  # cumulative kv lengths where per-row ones are due
        call(actual_seq_kvlen=[200, 300])
    with pytest.raises(EmulatorError, match="cumulative"):  # per-row query lengths where cumulative ones are due
        call(actual_seq_qlen=[8, 8])
    with pytest.raises(EmulatorError, match="compressed causal mask"):
        call(atten_mask=~MASK)
    with pytest.raises(EmulatorError, match="int32"):
        call(block_table=table.long())
    with pytest.raises(EmulatorError, match="multiple of 128"):  # page attention with Q_S > 1
        npu.npu_fused_infer_attention_score_v2(q, key.view(8, 64, 32), value.view(8, 64, 32), **{
            **base, "block_size": 64, "block_table": torch.arange(8, dtype=torch.int32).view(2, 4)})
    with pytest.raises(EmulatorError, match="list of ints"):
        call(actual_seq_kvlen=torch.tensor([200, 100]))
    with pytest.raises(NotImplementedError):  # learnable_sink is documented for TND / NTD_TND only
        call(input_layout="BSND")
    air = TorchairEmulator(npu)
    with pytest.raises(NotImplementedError, match="max-autotune"):  # the tensor-length variant is GE-graph only
        air.ops.npu_fused_infer_attention_score_v2(q, key, value, **base)


# -- MoE routing ----------------------------------------------------------------------------------------------------
def test_gating_top_k_softmax(npu):
    torch.manual_seed(5)
    x = torch.randn(6, 8)
    for k in (2, 8):  # edge: k = number of experts
        y, idx, row = npu.npu_moe_gating_top_k_softmax(x, None, k=k)
        p = np.exp(_np(x) - _np(x).max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        order = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(idx.numpy(), order)
        np.testing.assert_allclose(_np(y), np.take_along_axis(p, order, -1), rtol=1e-6)
        assert idx.dtype == row.dtype == torch.int32
        np.testing.assert_array_equal(row.numpy(), [[j * 6 + n for j in range(k)] for n in range(6)])


def test_init_routing(npu):
    torch.manual_seed(6)
    n, k = 5, 2
    x = torch.randn(n, 8)
    experts = torch.tensor([[1, 3], [0, 1], [3, 0], [1, 0], [0, 3]], dtype=torch.int32)  # edge: expert 2 unused
    row_idx = torch.arange(n * k, dtype=torch.int32).view(k, n).t().contiguous()
    ex, src_to_dst, sorted_e = npu.npu_moe_init_routing(x, row_idx, experts, active_num=n)
    pairs = sorted(((int(experts[i, j]), i * k + j) for i in range(n) for j in range(k)))  # stable on flat index
    np.testing.assert_array_equal(sorted_e.numpy(), [p[0] for p in pairs])
    for pos, (exp_id, flat) in enumerate(pairs):
        i, j = divmod(flat, k)
        np.testing.assert_array_equal(ex[pos].numpy(), x[i].numpy())
        assert src_to_dst[j * n + i] == pos  # source pair (i, j) is entry j*N + i
    with pytest.raises(EmulatorError, match="int32"):
        npu.npu_moe_init_routing(x, row_idx, experts.long(), active_num=n)


def test_compute_expert_tokens(npu):
    experts = torch.tensor([0, 0, 1, 1, 1, 3, 3], dtype=torch.int32)  # edge: expert 2 has no rows, nor has 4
    ends = npu.npu_moe_compute_expert_tokens(experts, 5)
    counts = np.bincount(experts.numpy(), minlength=5)
    np.testing.assert_array_equal(ends.numpy(), np.cumsum(counts))  # cumulative ends, not counts
    np.testing.assert_array_equal(ends.numpy(), [2, 5, 5, 7, 7])
    assert ends.dtype == torch.int32
    with pytest.raises(EmulatorError, match="sorted"):
        npu.npu_moe_compute_expert_tokens(torch.tensor([1, 0], dtype=torch.int32), 2)
    with pytest.raises(EmulatorError, match="int32"):
        npu.npu_moe_compute_expert_tokens(experts.long(), 5)


def test_grouped_matmul(npu):
    torch.manual_seed(7)
    sizes = [3, 0, 4]  # edge: an expert with no rows
    x, w, b = torch.randn(7, 5), torch.randn(3, 5, 6), torch.randn(3, 6)
    expected = np.concatenate([_np(x[s:s + n]) @ _np(w[g]) + _np(b[g])
                               for g, (s, n) in enumerate(zip(np.cumsum([0] + sizes[:-1]), sizes))])
    for gl, kind in ((torch.tensor([3, 3, 7]), 0), (torch.tensor([3, 0, 4]), 1)):  # cumulative, then counts
        (y,) = npu.npu_grouped_matmul([x], [w], bias=[b], group_list=gl, split_item=3, group_type=0,
                                      group_list_type=kind)
        np.testing.assert_allclose(_np(y), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(EmulatorError, match="int64"):
        npu.npu_grouped_matmul([x], [w], bias=[b], group_list=torch.tensor([3, 3, 7], dtype=torch.int32),
                               split_item=3, group_type=0)
    with pytest.raises(EmulatorError, match="cumulative"):  # counts passed as if cumulative
        npu.npu_grouped_matmul([x], [w], bias=[b], group_list=torch.tensor([3, 0, 4]), split_item=3,
                               group_type=0, group_list_type=0)
    with pytest.raises(EmulatorError, match="end at"):  # rows left out of every group
        npu.npu_grouped_matmul([x], [w], bias=[b], group_list=torch.tensor([3, 3, 6]), split_item=3, group_type=0)
    with pytest.raises(EmulatorError, match="bias"):  # bf16 x takes an fp32 bias
        npu.npu_grouped_matmul([x.bfloat16()], [w.bfloat16()], bias=[b.bfloat16()],
                               group_list=torch.tensor([3, 3, 7]), split_item=3, group_type=0)


def test_clipped_swiglu(npu):
    torch.manual_seed(8)
    x = torch.randn(4, 10) * 6  # edge: values beyond the limit on both sides
    y = npu.npu_clipped_swiglu(x, dim=-1, alpha=1.702, limit=7.0, bias=1.0, interleaved=True)
    a, b = np.minimum(_np(x)[:, 0::2], 7.0), np.clip(_np(x)[:, 1::2], -7.0, 7.0)
    np.testing.assert_allclose(_np(y), a / (1 + np.exp(-1.702 * a)) * (b + 1), rtol=1e-5, atol=1e-6)
    y2 = npu.npu_clipped_swiglu(x, interleaved=False)
    a, b = np.minimum(_np(x)[:, :5], 7.0), np.clip(_np(x)[:, 5:], -7.0, 7.0)
    np.testing.assert_allclose(_np(y2), a / (1 + np.exp(-1.702 * a)) * (b + 1), rtol=1e-5, atol=1e-6)
    assert not hasattr(make_torch_npu(clipped_swiglu=False), "npu_clipped_swiglu")  # older torch_npu


def test_finalize_routing(npu):
    torch.manual_seed(9)
    n, k, e, h = 4, 3, 5, 6
    rows = torch.randn(n * k, h)
    scales = torch.rand(n, k)
    experts = torch.randint(0, e, (n, k), dtype=torch.int32)
    bias = torch.randn(e, h)
    skip = torch.randn(n, h)
    src_to_dst = torch.randperm(n * k).to(torch.int32)
    out = npu.npu_moe_finalize_routing(rows, skip, None, bias, scales, src_to_dst, experts, drop_pad_mode=0)
    expected = _np(skip).copy()
    for i in range(n):
        for j in range(k):
            expected[i] += _np(scales)[i, j] * (_np(rows)[int(src_to_dst[j * n + i])] + _np(bias)[experts[i, j]])
    np.testing.assert_allclose(_np(out), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(EmulatorError, match="skip2"):
        npu.npu_moe_finalize_routing(rows, None, skip, None, scales, src_to_dst, experts)
    with pytest.raises(EmulatorError, match="scales"):
        npu.npu_moe_finalize_routing(rows, None, None, None, scales.double(), src_to_dst, experts)


# -- limits the device enforces (each of these was accepted by the emulator before) ---------------------------------
def _fia_tnd_args(qlens=(8, 8), kvlens=(100, 100)):
    _, _, key, value, table = _paged(2, 256, 2, 16, list(kvlens), order=[0, 1, 2, 3])
    q = torch.randn(sum(qlens), 4, 16).bfloat16()
    kw = dict(atten_mask=MASK, actual_seq_qlen=np.cumsum(qlens).tolist(), actual_seq_kvlen=list(kvlens),
              block_table=table, learnable_sink=torch.randn(4).bfloat16(), num_query_heads=4, num_key_value_heads=2,
              softmax_scale=0.25, next_tokens=0, input_layout="TND", sparse_mode=3, block_size=128)
    return q, key, value, kw


def test_fia_v2_tnd_is_bf16_only(npu):
    """TND with D != 512 takes bfloat16 only (op-plugin FIA v2 docs; the PFA tiling: "When layout is TND,
    inputDataType should be bf16"), learnable_sink included."""
    q, key, value, kw = _fia_tnd_args()
    npu.npu_fused_infer_attention_score_v2(q, key, value, **kw)
    for dtype in (torch.float32, torch.float16):
        with pytest.raises(EmulatorError, match="bfloat16 query only"):
            npu.npu_fused_infer_attention_score_v2(q.to(dtype), key.to(dtype), value.to(dtype), **kw)
    with pytest.raises(EmulatorError, match="learnable_sink must be bfloat16"):
        npu.npu_fused_infer_attention_score_v2(q, key, value, **{**kw, "learnable_sink": torch.randn(4)})


def test_fia_v2_sparse_mode_preconditions(npu):
    """Mode 3: per batch qlen <= kvlen; band: pre_tokens >= 0 and next_tokens + kvlen - qlen >= 0."""
    q, key, value, kw = _fia_tnd_args(qlens=(8, 8), kvlens=(8, 100))
    npu.npu_fused_infer_attention_score_v2(q, key, value, **kw)  # equal counts: a plain causal prefill
    q, key, value, kw = _fia_tnd_args(qlens=(8, 8), kvlens=(5, 100))
    with pytest.raises(EmulatorError, match="sparse_mode=3 needs actual_seq_qlen <= actual_seq_kvlen"):
        npu.npu_fused_infer_attention_score_v2(q, key, value, **kw)
    with pytest.raises(EmulatorError, match="next_tokens \\+ actual_seq_kvlen"):
        npu.npu_fused_infer_attention_score_v2(q, key, value, **{**kw, "sparse_mode": 4, "pre_tokens": 3})
    q, key, value, kw = _fia_tnd_args()
    with pytest.raises(EmulatorError, match="pre_tokens >= 0"):
        npu.npu_fused_infer_attention_score_v2(q, key, value, **{**kw, "sparse_mode": 4, "pre_tokens": -1})


def test_fully_masked_row_with_sink_is_nan():
    """The kernel's row max excludes the sink, so a row with no visible key computes exp(sink - (-inf)): NaN, not
    the 0 a softmax over [-inf..., sink] gives. The computation itself is modelled (the call checks above refuse
    the inputs that produce such rows)."""
    q, k, v = torch.randn(4, 1, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    out = _attention_rows(q, k, v, [4], [2], None, 0, torch.zeros(1), 1, 1.0, 2**31 - 1, 0, 3, paged=False)
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2:]).all()  # rows 0, 1 sit before the first key


def _attention_fn(npu, air, lengths_in_graph):
    """A TND FIA call as a compiled graph would hold it: lengths as tensors (GE), or computed in the graph and
    handed over as host ints (the old aclgraph path)."""
    q, key, value, kw = _fia_tnd_args()

    if lengths_in_graph:
        def fn(q, key, value, kv_lens):
            lens = kv_lens.tolist()
            return npu.npu_fused_infer_attention_score_v2(q, key, value, **{**kw, "actual_seq_kvlen": lens})[0]
    else:
        def fn(q, key, value, kv_lens):
            return air.ops.npu_fused_infer_attention_score_v2(
                q, key, value, **{**kw, "actual_seq_qlen": torch.tensor(kw["actual_seq_qlen"]),
                                  "actual_seq_kvlen": kv_lens})[0]
    return fn, (q, key, value, torch.tensor(kw["actual_seq_kvlen"]))


def test_tiling_sink_refuses_tnd_attention(npu):
    """hicann ops-transformer prompt_flash_attention_tiling.cpp: "When layout is TND/NTD_TND, not support
    tiling_schedule_optimize = True or config mode is reduce-overhead!" (vllm-ascend #5771 on a 910B3)."""
    torch._dynamo.reset()
    air = TorchairEmulator(npu)
    fn, args = _attention_fn(npu, air, lengths_in_graph=False)
    config = air.CompilerConfig()
    config.experimental_config.tiling_schedule_optimize = True
    with pytest.raises(Exception, match="not support tiling_schedule_optimize = True"):
        torch.compile(fn, backend=air.get_npu_backend(compiler_config=config), fullgraph=True, dynamic=False)(*args)
    torch._dynamo.reset()
    config.experimental_config.tiling_schedule_optimize = False
    out = torch.compile(fn, backend=air.get_npu_backend(compiler_config=config), fullgraph=True, dynamic=False)(*args)
    assert torch.isfinite(out).all()


def test_aclgraph_refuses_host_sync_and_tnd_attention(npu):
    """aclgraph (reduce-overhead): no host sync inside the captured graph, FIA lengths only from graph inputs or
    constants (torchair acl_graph.py get_update_ruler), and the PFA tiling refuses TND under reduce-overhead."""
    air = TorchairEmulator(npu)
    config = air.CompilerConfig()
    config.mode = "reduce-overhead"
    backend = air.get_npu_backend(compiler_config=config)
    torch._dynamo.reset()
    fn, args = _attention_fn(npu, air, lengths_in_graph=True)
    with torch._dynamo.config.patch(capture_scalar_outputs=True), pytest.raises(Exception, match="syncs the host"):
        torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
    torch._dynamo.reset()
    fn, args = _attention_fn(npu, air, lengths_in_graph=False)
    with pytest.raises(Exception, match="only sym and constant"):  # lengths computed in the graph
        torch.compile(lambda q, k, v, lens: fn(q, k, v, lens + 0), backend=backend, fullgraph=True,
                      dynamic=False)(*args)
    torch._dynamo.reset()
    q, key, value, kw = _fia_tnd_args()  # host constants pass the updater; the tiling refuses TND in aclgraph
    with pytest.raises(Exception, match="config mode is reduce-overhead"):
        torch.compile(lambda q, k, v: npu.npu_fused_infer_attention_score_v2(q, k, v, **kw)[0], backend=backend,
                      fullgraph=True, dynamic=False)(q, key, value)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="not in optional list"):  # torchair 7.3.0's CompilerConfig
        air.CompilerConfig().mode = "npugraph_ex"
