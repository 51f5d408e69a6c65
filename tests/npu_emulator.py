"""TEST-ONLY emulator of the torch_npu ops (and the torchair pieces) the `npu` op table and graph/torchair.py use.

Never imported by shipped code and never a runtime fallback: a pytest fixture puts `make_torch_npu()` /
`make_torchair()` into `sys.modules` as `torch_npu` / `torchair` and removes them afterwards.

Each op follows its documentation in Ascend/op-plugin (`docs/zh/custom_APIs/torch_npu/<op>.md`, signatures in
`op_plugin/config/op_plugin_functions.yaml`): argument names, layouts, index dtypes, cumulative vs per-row lengths,
returned tuples. Calls outside what is documented (or outside what this emulator implements) raise `EmulatorError`
(or NotImplementedError), so a misused op fails the test instead of being silently "right". Where the real op
does no checking (out-of-range indices, unsorted input, block ids), the emulator checks, because on the device
such a call corrupts memory or returns garbage.

Limits the device enforces and a CPU cannot see by itself, modelled here (each from the sources named inline):
- FIA v2 in TND (the only layout with `learnable_sink`) takes bfloat16 only, `learnable_sink` included.
- Sparse mode 3 needs every row's query count <= its key count, band mode pre_tokens >= 0 and
  next_tokens + kvlen - qlen >= 0; a fully masked query row with a learnable sink comes out NaN (the kernel's row
  max excludes the sink, so it computes exp(sink - (-inf))).
- Graphs (the emulated torchair backend inspects each FX graph it is given): a TND FIA in a graph compiled with
  `tiling_schedule_optimize=True` or mode "reduce-overhead" is refused with the kernel's message; an aclgraph
  (reduce-overhead) graph may not sync the host (`.item()`/`.tolist()`), and FIA's lengths in it must be graph
  inputs or constants (torchair's replay updater refreshes only those).

Each op is a `torch.library.custom_op` in the `npu_emu` namespace with a shape-only fake, as the real torch_npu ops
are `torch.ops.npu.*` with meta functions: dynamo traces each as one opaque node, so the torchair compile path can
be traced on CPU. Argument checks that need only shapes/dtypes run in the Python wrappers (at trace time too);
checks on values run inside the ops.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import sys
import types
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

MASK_SIZE = 2048
_ACTIVE: list = []  # the latest emulator instance, whose `calls` the ops count into
_IN_GRAPH: list = []  # non-empty while a compiled (or cache-loaded) graph runs
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class EmulatorError(ValueError):
    """A call outside the documented semantics of the emulated op."""


def _check(cond, msg: str) -> None:
    if not cond:
        raise EmulatorError(msg)


# =====================================================================================================================
# The ops, as custom ops: eager implementations from the documented formulas (computed in float64), shape-only fakes.
# =====================================================================================================================
@custom_op("npu_emu::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, gamma: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.double()
    rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.double()).to(x.dtype), rstd.float()


@_rms_norm.register_fake
def _(x, gamma, epsilon):
    lead = x.shape[: x.dim() - gamma.dim()]
    return x.new_empty(x.shape), x.new_empty((*lead, *([1] * gamma.dim())), dtype=torch.float32)


@custom_op("npu_emu::add_rms_norm", mutates_args=())
def _add_rms_norm(x1: Tensor, x2: Tensor, gamma: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    summed = (x1.double() + x2.double()).to(x1.dtype)  # xOut has x1's dtype; the norm reads it
    y, rstd = _rms_norm(summed, gamma, epsilon)
    return y, rstd, summed


@_add_rms_norm.register_fake
def _(x1, x2, gamma, epsilon):
    lead = x1.shape[: x1.dim() - gamma.dim()]
    return (x1.new_empty(x1.shape), x1.new_empty((*lead, *([1] * gamma.dim())), dtype=torch.float32),
            x1.new_empty(x1.shape))


@custom_op("npu_emu::scatter_update_", mutates_args=("data",))
def _scatter_update_(data: Tensor, indices: Tensor, updates: Tensor, axis: int) -> None:
    length = updates.shape[axis]
    for b, start in enumerate(indices.tolist()):
        _check(0 <= start and start + length <= data.shape[axis],
               f"scatter_update_: row {b} writes [{start}, {start + length}) outside axis {axis} of size "
               f"{data.shape[axis]} (the real op does no bounds check)")
        data[b].narrow(axis - 1, start, length).copy_(updates[b])


@_scatter_update_.register_fake
def _(data, indices, updates, axis):
    return None


def _attention_rows(query, key, value, qcum, kvlens, block_table, block_size, learnable_sink, kv_heads, scale,
                    pre_tokens, next_tokens, sparse_mode, paged):
    """The FIA v2 computation for TND queries, one batch row at a time (float64)."""
    tokens, q_heads, _ = query.shape
    group = q_heads // kv_heads
    head_dim_v = value.shape[-1] // kv_heads if paged else value.shape[-1]
    out = torch.zeros(tokens, q_heads, head_dim_v, dtype=torch.float64)
    q0 = k0 = 0
    for b, q1 in enumerate(qcum):
        qlen = q1 - q0
        if paged:
            kvlen = kvlens[b]
            nblk = -(-kvlen // block_size)
            ids = block_table[b, :nblk].long()
            k = key[ids].reshape(nblk * block_size, kv_heads, -1)[:kvlen]
            v = value[ids].reshape(nblk * block_size, kv_heads, -1)[:kvlen]
        else:
            k1 = kvlens[b]
            kvlen = k1 - k0
            k, v = key[k0:k1], value[k0:k1]
            k0 = k1
        q = query[q0:q1].double()
        k = k.double().repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        v = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        i = torch.arange(qlen)[:, None]
        j = torch.arange(kvlen)[None, :]
        diag = kvlen - qlen + i  # right-down alignment: the last query row sits at the last key
        if sparse_mode == 3:
            visible = j <= diag
        elif sparse_mode == 4:
            visible = (j >= diag - pre_tokens) & (j <= diag + next_tokens)
        else:
            visible = torch.ones(qlen, kvlen, dtype=torch.bool)
        scores = scores.masked_fill(~visible, float("-inf"))
        if learnable_sink is not None:
            sink = learnable_sink.double().view(q_heads, 1, 1).expand(q_heads, qlen, 1)
            probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
            # the kernel's running row max covers the keys only: a row with no visible key divides by
            # exp(sink - (-inf)) = inf and comes out NaN (hicann ops-transformer, FIA sink handling)
            probs = probs.masked_fill(~visible.any(-1)[None, :, None], float("nan"))
        else:
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v)
        q0 = q1
    return out


_MASKS: list = []


def _compressed_mask() -> Tensor:
    if not _MASKS:
        _MASKS.append(torch.triu(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool), diagonal=1))
    return _MASKS[0]


def _fia_values(query, key, value, atten_mask, qcum, kvlens, block_table, learnable_sink, kv_heads, scale,
                pre_tokens, next_tokens, sparse_mode, block_size):
    tokens = query.shape[0]
    batch = len(qcum)
    _check(batch >= 1 and batch <= 4096, "actual_seq_qlen must have 1..4096 entries (the batch count in TND)")
    _check(all(x >= 0 for x in qcum) and all(b >= a for a, b in zip(qcum, qcum[1:])),
           f"actual_seq_qlen must be cumulative (non-decreasing, >= 0) in TND, got {qcum}")
    _check(qcum[-1] == tokens, f"actual_seq_qlen must end at T={tokens} (cumulative), got {qcum}")
    qlens = [b - a for a, b in zip([0] + qcum[:-1], qcum)]
    paged = block_table is not None
    if paged:
        _check(len(kvlens) == batch, f"with block_table, actual_seq_kvlen holds one length per batch row "
                                     f"({batch}), got {len(kvlens)}")
        capacity = block_table.shape[1] * block_size
        for b, n in enumerate(kvlens):
            _check(0 <= n <= capacity, f"actual_seq_kvlen[{b}]={n} exceeds the block table's "
                                       f"{block_table.shape[1]} blocks x {block_size} (not per-row lengths?)")
            nblk = -(-n // block_size)
            ids = block_table[b, :nblk]
            _check(bool(((ids >= 0) & (ids < key.shape[0])).all()),
                   f"block_table row {b} names blocks outside 0..{key.shape[0] - 1}")
        if max(qlens) > 1:
            _check(block_size % 128 == 0 and 128 <= block_size <= 512,
                   "page attention with Q_S > 1 needs block_size a multiple of 128 in [128, 512]")
    else:
        _check(len(kvlens) == batch and all(b >= a for a, b in zip(kvlens, kvlens[1:]))
               and kvlens[-1] == key.shape[0],
               f"TND without block_table takes cumulative actual_seq_kvlen ending at {key.shape[0]}, got {kvlens}")
    row_kv = kvlens if paged else [b - a for a, b in zip([0] + kvlens[:-1], kvlens)]
    # op-plugin FIA v2 docs: sparse_mode 3 needs each batch's actual_seq_qlen <= actual_seq_kvlen (the TND section
    # words it as "<"; equal counts are a plain causal prefill), band mode pre_tokens >= 0 and
    # next_tokens + kvlen - qlen >= 0; otherwise whole query rows take no part in the computation
    if sparse_mode == 3:
        bad = [b for b, (q, k) in enumerate(zip(qlens, row_kv)) if q > k]
        _check(not bad, f"sparse_mode=3 needs actual_seq_qlen <= actual_seq_kvlen per batch; rows {bad} have "
                        f"more queries than keys (qlen {[qlens[b] for b in bad]}, kvlen {[row_kv[b] for b in bad]})")
    if sparse_mode == 4:
        _check(pre_tokens >= 0, f"sparse_mode=4 needs pre_tokens >= 0, got {pre_tokens}")
        bad = [b for b, (q, k) in enumerate(zip(qlens, row_kv)) if next_tokens + k - q < 0]
        _check(not bad, f"sparse_mode=4 needs next_tokens + actual_seq_kvlen - actual_seq_qlen >= 0; rows {bad} "
                        f"break it")
    if sparse_mode in (2, 3, 4):
        _check(atten_mask is not None, f"sparse_mode={sparse_mode} needs the 2048x2048 compressed atten_mask")
        _check(torch.equal(atten_mask.reshape(MASK_SIZE, MASK_SIZE).bool().cpu(), _compressed_mask()),
               "atten_mask for sparse modes 2-4 must be the compressed causal mask: True above the diagonal")
    out = _attention_rows(query, key, value, qcum, kvlens, block_table, block_size, learnable_sink, kv_heads,
                          scale, pre_tokens, next_tokens, sparse_mode, paged)
    return out.to(query.dtype), torch.zeros(1, dtype=torch.float32)


def _fia_fake_out(query, key, value, kv_heads, paged):
    dv = value.shape[-1] // kv_heads if paged and value.dim() == 3 else value.shape[-1]
    return query.new_empty((query.shape[0], query.shape[1], dv)), query.new_empty((1,), dtype=torch.float32)


@custom_op("npu_emu::fia_v2", mutates_args=())
def _fia_v2(query: Tensor, key: Tensor, value: Tensor, atten_mask: Optional[Tensor], actual_seq_qlen: list[int],
            actual_seq_kvlen: list[int], block_table: Optional[Tensor], learnable_sink: Optional[Tensor],
            num_key_value_heads: int, softmax_scale: float, pre_tokens: int, next_tokens: int, sparse_mode: int,
            block_size: int) -> tuple[Tensor, Tensor]:
    return _fia_values(query, key, value, atten_mask, list(actual_seq_qlen), list(actual_seq_kvlen), block_table,
                       learnable_sink, num_key_value_heads, softmax_scale, pre_tokens, next_tokens, sparse_mode,
                       block_size)


@_fia_v2.register_fake
def _(query, key, value, atten_mask, actual_seq_qlen, actual_seq_kvlen, block_table, learnable_sink,
      num_key_value_heads, softmax_scale, pre_tokens, next_tokens, sparse_mode, block_size):
    return _fia_fake_out(query, key, value, num_key_value_heads, block_table is not None)


@custom_op("npu_emu::fia_v2_tensor_lengths", mutates_args=())
def _fia_v2_tensor(query: Tensor, key: Tensor, value: Tensor, atten_mask: Optional[Tensor], actual_seq_qlen: Tensor,
                   actual_seq_kvlen: Tensor, block_table: Optional[Tensor], learnable_sink: Optional[Tensor],
                   num_key_value_heads: int, softmax_scale: float, pre_tokens: int, next_tokens: int,
                   sparse_mode: int, block_size: int) -> tuple[Tensor, Tensor]:
    if _ACTIVE:
        _ACTIVE[0].calls["torchair.ops.npu_fused_infer_attention_score_v2"] += 1
    return _fia_values(query, key, value, atten_mask, actual_seq_qlen.tolist(), actual_seq_kvlen.tolist(),
                       block_table, learnable_sink, num_key_value_heads, softmax_scale, pre_tokens, next_tokens,
                       sparse_mode, block_size)


@_fia_v2_tensor.register_fake
def _(query, key, value, atten_mask, actual_seq_qlen, actual_seq_kvlen, block_table, learnable_sink,
      num_key_value_heads, softmax_scale, pre_tokens, next_tokens, sparse_mode, block_size):
    return _fia_fake_out(query, key, value, num_key_value_heads, block_table is not None)


@custom_op("npu_emu::moe_gating_top_k_softmax", mutates_args=())
def _gating(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    probs = torch.softmax(x.double(), dim=-1)
    y, idx = torch.topk(probs, k, dim=-1, sorted=True)
    rows = x.shape[0]
    row_idx = torch.arange(rows * k, dtype=torch.int32).reshape(k, rows).t().contiguous()
    return y.to(x.dtype), idx.to(torch.int32), row_idx


@_gating.register_fake
def _(x, k):
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int32), x.new_empty(shape, dtype=torch.int32)


@custom_op("npu_emu::moe_init_routing", mutates_args=())
def _init_routing(x: Tensor, row_idx: Tensor, expert_idx: Tensor, active_num: int) -> tuple[Tensor, Tensor, Tensor]:
    rows, k = expert_idx.shape
    flat = expert_idx.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # keyValueSort(expert_idx, row_idx)
    sorted_experts = flat[order].to(torch.int32)
    dst_to_src = row_idx.reshape(-1).long()[order]  # sorted position -> source pair id (k*N + n)
    src_to_dst = torch.empty(rows * k, dtype=torch.int32)
    src_to_dst[dst_to_src] = torch.arange(rows * k, dtype=torch.int32)
    active = min(active_num, rows) * k
    expanded_x = x[dst_to_src[:active] % rows]
    return expanded_x, src_to_dst, sorted_experts


@_init_routing.register_fake
def _(x, row_idx, expert_idx, active_num):
    rows, k = expert_idx.shape
    return (x.new_empty((min(active_num, rows) * k, x.shape[1])), x.new_empty((rows * k,), dtype=torch.int32),
            x.new_empty((rows * k,), dtype=torch.int32))


@custom_op("npu_emu::moe_compute_expert_tokens", mutates_args=())
def _compute_expert_tokens(sorted_experts: Tensor, num_expert: int) -> Tensor:
    vals = sorted_experts.long()
    _check(bool(((vals >= 0) & (vals < num_expert)).all()),
           f"npu_moe_compute_expert_tokens: expert ids must lie in [0, {num_expert - 1}]")
    _check(bool((vals[1:] >= vals[:-1]).all()), "npu_moe_compute_expert_tokens: input must be sorted (non-decreasing)")
    ends = torch.searchsorted(vals, torch.arange(num_expert), right=True)  # rows with expert <= i
    return ends.to(sorted_experts.dtype)


@_compute_expert_tokens.register_fake
def _(sorted_experts, num_expert):
    return sorted_experts.new_empty((num_expert,))


@custom_op("npu_emu::grouped_matmul", mutates_args=())
def _grouped_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor], group_list: Tensor,
                    group_list_type: int) -> Tensor:
    gl = group_list.tolist()
    rows = x.shape[0]
    if group_list_type == 0:
        _check(all(g >= 0 for g in gl) and all(b >= a for a, b in zip(gl, gl[1:])),
               f"group_list_type=0 takes a cumulative (non-negative, non-decreasing) group_list, got {gl}")
        _check(gl[-1] == rows, f"cumulative group_list must end at x's {rows} rows, got {gl[-1]}")
        ends = gl
    else:
        _check(all(g >= 0 for g in gl) and sum(gl) == rows,
               f"group_list_type=1 takes per-group counts summing to x's {rows} rows, got {gl}")
        ends = torch.tensor(gl).cumsum(0).tolist()
    out = torch.zeros(rows, weight.shape[2], dtype=torch.float64)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = x[start:end].double() @ weight[e].double()
            if bias is not None:
                out[start:end] += bias[e].double()
        start = end
    return out.to(x.dtype)


@_grouped_matmul.register_fake
def _(x, weight, bias, group_list, group_list_type):
    return x.new_empty((x.shape[0], weight.shape[2]))


@custom_op("npu_emu::clipped_swiglu", mutates_args=())
def _clipped_swiglu(x: Tensor, dim: int, alpha: float, limit: float, bias: float, interleaved: bool) -> Tensor:
    dim = dim % x.dim()
    pre = int(torch.tensor(x.shape[:dim]).prod()) if dim else 1
    cut = x.shape[dim]
    after = int(torch.tensor(x.shape[dim + 1:]).prod()) if dim + 1 < x.dim() else 1
    xs = x.double().reshape(pre, cut, after)
    if interleaved:
        a, b = xs[:, 0::2], xs[:, 1::2]
    else:
        a, b = xs[:, : cut // 2], xs[:, cut // 2:]
    a = a.clamp(max=limit)
    b = b.clamp(min=-limit, max=limit)
    y = a * torch.sigmoid(alpha * a) * (b + bias)
    shape = list(x.shape)
    shape[dim] //= 2
    return y.reshape(shape).to(x.dtype)


@_clipped_swiglu.register_fake
def _(x, dim, alpha, limit, bias, interleaved):
    shape = list(x.shape)
    shape[dim] //= 2
    return x.new_empty(shape)


@custom_op("npu_emu::moe_finalize_routing", mutates_args=())
def _finalize(rows: Tensor, skip1: Optional[Tensor], skip2: Optional[Tensor], bias: Optional[Tensor],
              scales: Optional[Tensor], src_to_dst: Tensor, expert_for_source_row: Optional[Tensor],
              num_rows: int, k: int) -> Tensor:
    nk = num_rows * k
    dst = src_to_dst.long()
    _check(bool(((dst >= 0) & (dst < rows.shape[0])).all()),
           f"expanded_src_to_dst_row must lie in [0, {nk - 1}] (drop_pad_mode=0)")
    out = torch.zeros(num_rows, rows.shape[1], dtype=torch.float64)
    if skip1 is not None:
        out += skip1.double()
    if skip2 is not None:
        out += skip2.double()
    for j in range(k):
        value = rows[dst[j * num_rows:(j + 1) * num_rows]].double()  # column arrangement: pair (i, j) is j*N + i
        if bias is not None:
            value = value + bias[expert_for_source_row[:, j].long()].double()
        out += (scales[:, j, None].double() if scales is not None else 1.0) * value
    return out.to(rows.dtype)


@_finalize.register_fake
def _(rows, skip1, skip2, bias, scales, src_to_dst, expert_for_source_row, num_rows, k):
    return rows.new_empty((num_rows, rows.shape[1]))


# =====================================================================================================================
# torch_npu: the documented Python signatures, checking what they can see, then calling the ops above.
# =====================================================================================================================
class TorchNpuEmulator(types.ModuleType):
    """A `torch_npu` stand-in. `calls` counts eager op calls (and executed tensor-length FIA calls of graphs)."""

    __version__ = "2.13.0+emulated"

    def __init__(self, clipped_swiglu: bool = True):
        super().__init__("torch_npu")
        _ACTIVE[:] = [self]
        self.calls: Counter = Counter()
        if clipped_swiglu:  # newer torch_npu only; the op table must work without it
            self.npu_clipped_swiglu = self._npu_clipped_swiglu
        npu = types.ModuleType("torch_npu.npu")
        npu.utils = types.SimpleNamespace(get_cann_version=lambda module="CANN": "emulated")
        self.npu = npu

    def _count(self, name: str) -> None:
        """Eager calls only: inside a trace the counter would become a dynamo guard (and a recompile per call).
        Traced graphs are counted where they run: the tensor-length FIA op counts itself."""
        if not torch.compiler.is_compiling():
            self.calls[name] += 1

    # -- norms ---------------------------------------------------------------------------------------------------
    def npu_rms_norm(self, self_, gamma, epsilon=1e-06):
        self._count("npu_rms_norm")
        _check(2 <= self_.dim() <= 8, "npu_rms_norm: x must have 2-8 dims")
        _check(tuple(gamma.shape) == tuple(self_.shape[self_.dim() - gamma.dim():]),
               "npu_rms_norm: gamma must match x's trailing dims")
        pairs = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                 (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)}
        _check((self_.dtype, gamma.dtype) in pairs, f"npu_rms_norm: x {self_.dtype} with gamma {gamma.dtype} "
                                                    "is not a documented combination")
        return _rms_norm(self_, gamma, float(epsilon))

    def npu_add_rms_norm(self, x1, x2, gamma, epsilon=1e-06):
        self._count("npu_add_rms_norm")
        _check(x1.shape == x2.shape and x1.dtype == x2.dtype, "npu_add_rms_norm: x1 and x2 must match")
        _check(x1.dtype in FLOATS, f"npu_add_rms_norm: dtype {x1.dtype} not supported")
        _check(gamma.dtype == x1.dtype, "npu_add_rms_norm: gamma must have x1's dtype")
        _check(tuple(gamma.shape) == tuple(x1.shape[x1.dim() - gamma.dim():]),
               "npu_add_rms_norm: gamma must match x1's trailing dims")
        return _add_rms_norm(x1, x2, gamma, float(epsilon))

    # -- cache -----------------------------------------------------------------------------------------------------
    def scatter_update_(self, data, indices, updates, axis):
        self._count("scatter_update_")
        _check(2 <= data.dim() <= 8, "scatter_update_: data must have 2-8 dims")
        _check(data.dtype in (torch.int8, torch.float16, torch.float32, torch.bfloat16, torch.int32),
               f"scatter_update_: dtype {data.dtype} not supported")
        _check(updates.dtype == data.dtype and updates.dim() == data.dim(),
               "scatter_update_: updates must have data's dtype and rank")
        _check(indices.dtype in (torch.int32, torch.int64), "scatter_update_: indices must be int32 or int64")
        if indices.dim() != 1:
            raise NotImplementedError("scatter_update_ with 2-D indices is not emulated")
        _check(indices.shape[0] == data.shape[0] == updates.shape[0],
               "scatter_update_: one index per batch row (dim 0)")
        axis = axis % data.dim()
        _check(axis != 0, "scatter_update_: axis 0 is the batch axis the indices enumerate")
        for d in range(data.dim()):
            if d != axis:
                _check(updates.shape[d] == data.shape[d], f"scatter_update_: updates dim {d} must match data")
        _check(updates.shape[axis] <= data.shape[axis], "scatter_update_: updates longer than data along axis")
        _scatter_update_(data, indices, updates, axis)
        return data

    # -- attention -------------------------------------------------------------------------------------------------
    def _fia_static_checks(self, query, key, value, atten_mask, block_table, learnable_sink, num_query_heads,
                           num_key_value_heads, input_layout, sparse_mode, block_size, extra):
        unsupported = {k: v for k, v in extra.items() if v not in (None, 0, False)}
        if unsupported:
            raise NotImplementedError(f"npu_fused_infer_attention_score_v2: {sorted(unsupported)} not emulated")
        if input_layout != "TND":
            raise NotImplementedError(f"npu_fused_infer_attention_score_v2: layout {input_layout} not emulated")
        _check(query.dim() == 3, "TND query is (T, Q_N, D)")
        _check(query.is_contiguous() and key.is_contiguous() and value.is_contiguous(),
               "FIA v2 does not take non-contiguous query/key/value")
        _check(key.shape == value.shape, "key and value shapes must match")
        _check(num_query_heads == query.shape[1], f"num_query_heads={num_query_heads} but query has "
                                                 f"{query.shape[1]} heads")
        kv_heads = num_key_value_heads or num_query_heads
        _check(num_query_heads % kv_heads == 0 and num_query_heads // kv_heads <= 64,
               "num_key_value_heads must divide num_query_heads with a ratio <= 64")
        dims = query.shape[2]
        if block_table is not None:
            _check(block_table.dtype == torch.int32 and block_table.dim() == 2,
                   "block_table must be a 2-D int32 tensor")
            _check(block_size > 0 and block_size % 16 == 0 and block_size <= 1024,
                   "TND page attention needs block_size 16-aligned and <= 1024")
            if key.dim() == 3:
                _check(key.shape[1] == block_size and key.shape[2] == kv_heads * dims,
                       f"paged key must be (blocknum, block_size={block_size}, KV_N*D={kv_heads * dims}), "
                       f"got {tuple(key.shape)}")
            else:
                raise NotImplementedError("paged key layout (blocknum, KV_N, blocksize, D) not emulated")
        else:
            _check(key.dim() == 3 and key.shape[1] == kv_heads and key.shape[2] == dims,
                   "TND key is (T, KV_N, D)")
        _check(sparse_mode in (0, 3, 4), f"sparse_mode={sparse_mode} not emulated")
        if sparse_mode == 0:
            _check(atten_mask is None, "sparse_mode=0 with a user mask is not emulated")
        else:
            _check(atten_mask is not None and atten_mask.dtype in (torch.bool, torch.int8, torch.uint8)
                   and tuple(atten_mask.shape) in ((MASK_SIZE, MASK_SIZE), (1, MASK_SIZE, MASK_SIZE),
                                                   (1, 1, MASK_SIZE, MASK_SIZE)),
                   f"sparse_mode={sparse_mode} takes the 2048x2048 bool/int8/uint8 compressed mask")
        if learnable_sink is not None:
            _check(tuple(learnable_sink.shape) == (num_query_heads,), "learnable_sink has shape (Q_N,)")
            _check(dims <= 128, "learnable_sink needs value D <= 128")
        # TND with D != 512: "数据类型仅支持BFLOAT16" (op-plugin FIA v2 docs); PFA tiling: "When layout is TND,
        # inputDataType should be bf16"; the kernel reads learnable_sink as raw bf16
        _check(query.dtype == torch.bfloat16, f"FIA v2 with input_layout TND takes bfloat16 query only, got "
                                              f"{query.dtype}")
        _check(learnable_sink is None or learnable_sink.dtype == torch.bfloat16,
               f"learnable_sink must be bfloat16, got {getattr(learnable_sink, 'dtype', None)}")
        _check(key.dtype == query.dtype, "key/value dtype must match the query here (no quantisation)")
        return kv_heads

    def npu_fused_infer_attention_score_v2(self, query, key, value, *, atten_mask=None, actual_seq_qlen=None,
                                           actual_seq_kvlen=None, block_table=None, learnable_sink=None,
                                           num_query_heads=1, num_key_value_heads=0, softmax_scale=1.0,
                                           pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                                           sparse_mode=0, block_size=0, return_softmax_lse=False, **extra):
        self._count("npu_fused_infer_attention_score_v2")
        extra["return_softmax_lse"] = return_softmax_lse
        kv_heads = self._fia_static_checks(query, key, value, atten_mask, block_table, learnable_sink,
                                           num_query_heads, num_key_value_heads, input_layout, sparse_mode,
                                           block_size, extra)
        for name, lens in (("actual_seq_qlen", actual_seq_qlen), ("actual_seq_kvlen", actual_seq_kvlen)):
            _check(isinstance(lens, (list, tuple)) and all(isinstance(x, (int, torch.SymInt)) for x in lens),
                   f"torch_npu's {name} is a list of ints (SymInt[]) and TND requires it; got {type(lens)}")
        return _fia_v2(query, key, value, atten_mask, list(actual_seq_qlen), list(actual_seq_kvlen), block_table,
                       learnable_sink, kv_heads, float(softmax_scale), int(pre_tokens), int(next_tokens),
                       int(sparse_mode), int(block_size))

    # -- MoE -------------------------------------------------------------------------------------------------------
    def npu_moe_gating_top_k_softmax(self, x, finished=None, k=1):
        self._count("npu_moe_gating_top_k_softmax")
        _check(x.dtype in FLOATS, f"npu_moe_gating_top_k_softmax: dtype {x.dtype}")
        if x.dim() != 2:
            raise NotImplementedError("npu_moe_gating_top_k_softmax: only 2-D x is emulated")
        if finished is not None:
            raise NotImplementedError("npu_moe_gating_top_k_softmax: `finished` is not emulated")
        _check(isinstance(k, int) and 0 < k <= x.shape[-1] and k <= 1024, f"k={k} out of range")
        return _gating(x, k)

    def npu_moe_init_routing(self, x, row_idx, expert_idx, active_num):
        self._count("npu_moe_init_routing")
        _check(x.dim() == 2 and x.dtype in FLOATS, "npu_moe_init_routing: x is a 2-D float tensor (NUM_ROWS, H)")
        _check(expert_idx.dim() == 2 and expert_idx.dtype == torch.int32,
               f"npu_moe_init_routing: expert_idx is int32 (NUM_ROWS, K), got {expert_idx.dtype}")
        _check(row_idx.dtype == torch.int32 and row_idx.shape == expert_idx.shape,
               "npu_moe_init_routing: row_idx is int32 with expert_idx's shape")
        _check(expert_idx.shape[0] == x.shape[0], "npu_moe_init_routing: one expert_idx row per x row")
        _check(isinstance(active_num, int) and active_num >= 0, "active_num is a non-negative int")
        return _init_routing(x, row_idx, expert_idx, active_num)

    def npu_moe_compute_expert_tokens(self, sorted_expert_for_source_row, num_expert):
        self._count("npu_moe_compute_expert_tokens")
        t = sorted_expert_for_source_row
        _check(t.dim() == 1 and t.dtype == torch.int32, "npu_moe_compute_expert_tokens: input is 1-D int32")
        _check(isinstance(num_expert, int) and 0 < num_expert <= 2048, "num_expert must lie in (0, 2048]")
        return _compute_expert_tokens(t, num_expert)

    def npu_grouped_matmul(self, x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                           antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                           activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                           group_list_type=0, act_type=0, output_dtype=None, tuning_config=None):
        self._count("npu_grouped_matmul")
        for name, v in (("scale", scale), ("offset", offset), ("antiquant_scale", antiquant_scale),
                        ("antiquant_offset", antiquant_offset), ("per_token_scale", per_token_scale),
                        ("activation_input", activation_input), ("output_dtype", output_dtype),
                        ("tuning_config", tuning_config)):
            if v is not None:
                raise NotImplementedError(f"npu_grouped_matmul: {name} (quantisation) is not emulated")
        _check(act_type == 0, "npu_grouped_matmul: act_type must be 0 here")
        _check(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), "x and weight are lists")
        if not (len(x) == 1 and len(weight) == 1 and weight[0].dim() == 3):
            raise NotImplementedError("npu_grouped_matmul: only the single-x, single 3-D weight case is emulated")
        xs, w = x[0], weight[0]
        _check(group_type == 0, "one 3-D weight split along M needs group_type=0")
        _check(split_item in (2, 3), "one output tensor needs split_item 2 or 3")
        _check(xs.dim() == 2 and xs.shape[1] == w.shape[1], "x is (M, K) and weight (E, K, N)")
        _check(xs.dtype == w.dtype and xs.dtype in FLOATS, "x and weight dtypes must match (no quantisation)")
        _check(isinstance(group_list, torch.Tensor), "group_list must be a tensor here")
        _check(group_list.dim() == 1 and group_list.dtype == torch.int64,
               f"group_list is a 1-D int64 tensor, got {group_list.dtype}")
        _check(group_list.shape[0] == w.shape[0] and group_list.shape[0] <= 1024,
               "group_list has one entry per weight group (at most 1024)")
        if group_list_type not in (0, 1):
            raise NotImplementedError("group_list_type=2 is documented for int8 only")
        b = None
        if bias is not None:
            _check(isinstance(bias, (list, tuple)) and len(bias) == 1, "bias is a list like weight")
            b = bias[0]
            _check(tuple(b.shape) == (w.shape[0], w.shape[2]), f"bias for a single (E, K, N) weight is (E, N), "
                                                               f"got {tuple(b.shape)}")
            wanted = torch.float16 if xs.dtype == torch.float16 else torch.float32
            _check(b.dtype == wanted, f"npu_grouped_matmul: bias for {xs.dtype} x must be {wanted}, got {b.dtype}")
        return [_grouped_matmul(xs, w, b, group_list, int(group_list_type))]

    def _npu_clipped_swiglu(self, x, *, group_index=None, dim=-1, alpha=1.702, limit=7.0, bias=1.0,
                            interleaved=True):
        self._count("npu_clipped_swiglu")
        _check(x.dim() > 1 and x.dtype in FLOATS and x.is_contiguous(), "npu_clipped_swiglu: x is a contiguous "
                                                                        "float tensor with more than 1 dim")
        _check(-x.dim() <= dim < x.dim() and x.shape[dim] % 2 == 0, "npu_clipped_swiglu: dim must be even-sized")
        if group_index is not None:
            raise NotImplementedError("npu_clipped_swiglu: group_index is not emulated")
        return _clipped_swiglu(x, int(dim), float(alpha), float(limit), float(bias), bool(interleaved))

    def npu_moe_finalize_routing(self, expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                                 export_for_source_row, drop_pad_mode=0, k=1):
        self._count("npu_moe_finalize_routing")
        rows = expanded_permuted_rows
        if drop_pad_mode != 0:
            raise NotImplementedError("npu_moe_finalize_routing: only drop_pad_mode=0 is emulated")
        _check(rows.dim() == 2 and rows.dtype in FLOATS, "expanded_permuted_rows is (NUM_ROWS*K, H)")
        _check(skip1 is not None or skip2 is None, "skip2 must be None when skip1 is None")
        kk = scales.shape[1] if scales is not None else 1
        nk = expanded_src_to_dst_row.shape[0]
        _check(expanded_src_to_dst_row.dim() == 1 and expanded_src_to_dst_row.dtype == torch.int32,
               "expanded_src_to_dst_row is 1-D int32")
        _check(nk % kk == 0 and rows.shape[0] == nk, "expanded rows must hold NUM_ROWS*K rows")
        n = nk // kk
        for name, t in (("skip1", skip1), ("skip2", skip2)):
            if t is not None:
                _check(tuple(t.shape) == (n, rows.shape[1]) and t.dtype == rows.dtype, f"{name} is (NUM_ROWS, H)")
        if scales is not None:
            _check(scales.dtype == rows.dtype and tuple(scales.shape) == (n, kk),
                   f"scales are (NUM_ROWS, K) in the rows' dtype {rows.dtype}, got {scales.dtype}")
        if bias is not None:
            _check(bias.dim() == 2 and bias.shape[1] == rows.shape[1] and bias.dtype == rows.dtype,
                   "bias is (E, H) in the rows' dtype")
            _check(export_for_source_row is not None, "bias needs export_for_source_row (the experts)")
        if export_for_source_row is not None:
            _check(export_for_source_row.dtype == torch.int32 and tuple(export_for_source_row.shape) == (n, kk),
                   "export_for_source_row is int32 (NUM_ROWS, K)")
        return _finalize(rows, skip1, skip2, bias, scales, expanded_src_to_dst_row, export_for_source_row, n, kk)


# =====================================================================================================================
# torchair: CompilerConfig with the real option names and value checks, the backend, ops, inference.cache_compile.
# =====================================================================================================================
class _Options:
    """Fixed option set, like torchair's NpuBaseConfig: unknown names and values outside the allowed list raise."""

    def __init__(self, **options):
        object.__setattr__(self, "_options", dict(options))
        object.__setattr__(self, "_values", {k: v[0] for k, v in options.items() if not isinstance(v, _Options)})
        for k, v in options.items():
            if isinstance(v, _Options):
                object.__setattr__(self, k, v)

    def __getattr__(self, key):
        values = object.__getattribute__(self, "_values")
        if key in values:
            return values[key]
        raise AttributeError(key)

    def __setattr__(self, key, value):
        options = object.__getattribute__(self, "_options")
        if key not in options or isinstance(options[key], _Options):
            raise ValueError(f"{type(self).__name__} has no option {key}, all options {sorted(options)}")
        allowed = options[key][1]
        if allowed is not None and value not in allowed:
            raise ValueError(f"Value {value!r} not in optional list {allowed!r}")
        self._values[key] = value

    def as_dict(self) -> dict:
        out = dict(self._values)
        for k, v in self._options.items():
            if isinstance(v, _Options):
                out.update({f"{k}.{kk}": vv for kk, vv in v.as_dict().items()})
        return out


def make_compiler_config_class():
    class CompilerConfig(_Options):
        def __init__(self):
            super().__init__(
                # torchair 7.3.0: only these two; aclgraph's newer name npugraph_ex is a torch.compile backend
                mode=("max-autotune", ["max-autotune", "reduce-overhead"]),
                experimental_config=_Options(
                    frozen_parameter=(False, [True, False]),
                    tiling_schedule_optimize=(False, [True, False]),
                    keep_inference_input_mutations=(True, [True, False]),
                    topology_sorting_strategy=("DFS", ["BFS", "DFS", "RDFS", "StableRDFS"]),
                    memory_efficiency=(False, [True, False]),
                ),
                debug=_Options(),
                ge_config=_Options(),
            )
    return CompilerConfig


@contextmanager
def in_graph():
    _IN_GRAPH.append(True)
    try:
        yield
    finally:
        _IN_GRAPH.pop()


_FIA_OPS = ("npu_emu::fia_v2", "npu_emu::fia_v2_tensor_lengths")
_HOST_SYNCS = ("item", "tolist", "_local_scalar_dense")
TILING_SINK_TND = ("When layout is TND/NTD_TND, not support tiling_schedule_optimize = True or config mode is "
                   "reduce-overhead!")


def _target_name(node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "name", lambda: "")() if callable(getattr(target, "name", None)) else str(target)


def _fia_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and any(op in _target_name(n) for op in _FIA_OPS)]


def check_graph(gm, config) -> None:
    """What the device refuses about a whole graph, before it runs.

    - Every emulated FIA call is TND (other layouts raise NotImplementedError), and the PFA tiling refuses TND
      under tiling sink or reduce-overhead: hicann ops-transformer `prompt_flash_attention_tiling.cpp`
      (RunBigKernelTilingWithParams), the message vllm-ascend #5771 hit on a 910B3.
    - aclgraph capture cannot sync the host; torchair's replay updater (Ascend/torchair
      `python/torchair/_acl_concrete_graph/acl_graph.py`, get_update_ruler) takes FIA's actual_seq_qlen/kvlen
      only from graph inputs (SymInt placeholders) or constants."""
    fias = _fia_nodes(gm)
    aclgraph = config.mode == "reduce-overhead"
    if aclgraph:
        for n in gm.graph.nodes:
            if n.op in ("call_method", "call_function") and any(_target_name(n).endswith(s) for s in _HOST_SYNCS):
                raise EmulatorError(f"aclgraph capture: {n.format_node()} syncs the host inside the captured graph "
                                    f"(stream synchronize is not allowed while capturing)")
        placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
        for n in fias:
            for i, name in ((4, "actual_seq_qlen"), (5, "actual_seq_kvlen")):  # the custom ops' schema positions
                value = n.kwargs.get(name, n.args[i] if len(n.args) > i else None)
                items = value if isinstance(value, (list, tuple)) else [value]
                for item in items:
                    if isinstance(item, torch.fx.Node) and item not in placeholders:
                        raise EmulatorError(f"For updated param value only sym and constant is supported, but get "
                                            f"[{item}] ({name} of {n.name})")
    if fias and (config.experimental_config.tiling_schedule_optimize or aclgraph):
        raise EmulatorError(TILING_SINK_TND + "[FUNC:RunBigKernelTilingWithParams][FILE:prompt_flash_attention_"
                            "tiling.cpp] (emulated)")


class TorchairEmulator(types.ModuleType):
    """A `torchair` stand-in: `backends` records get_npu_backend configs, `cache_calls` the cache_compile calls."""

    def __init__(self, torch_npu: TorchNpuEmulator):
        super().__init__("torchair")
        self.torch_npu = torch_npu
        self.CompilerConfig = make_compiler_config_class()
        self.backends: list = []
        self.cache_calls: list[dict] = []
        self.cache_events: list[tuple[str, str]] = []  # ("compiled" | "loaded", path)
        self.traces = 0
        self.ops = types.ModuleType("torchair.ops")
        self.ops.npu_fused_infer_attention_score_v2 = self._ops_fia_v2
        self.inference = types.ModuleType("torchair.inference")
        self.inference.cache_compile = self._cache_compile
        self.configs = types.ModuleType("torchair.configs")
        self.configs.compiler_config = types.SimpleNamespace(CompilerConfig=self.CompilerConfig)

    def get_npu_backend(self, *, compiler_config=None):
        config = compiler_config if compiler_config is not None else self.CompilerConfig()
        self.backends.append(config)

        def backend(gm, example_inputs):
            self.traces += 1
            check_graph(gm, config)

            def run(*args):  # runs the traced graph; the emulated ops run eagerly inside it
                with in_graph():
                    return gm.forward(*args)
            return run

        backend.compiler_config = config
        return backend

    def _ops_fia_v2(self, query, key, value, *, atten_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                    block_table=None, learnable_sink=None, num_query_heads=1, num_key_value_heads=0,
                    softmax_scale=1.0, pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                    sparse_mode=0, block_size=0, return_softmax_lse=False, **extra):
        """torchair.ops.npu_fused_infer_attention_score_v2: lengths as tensors, GE graph mode only."""
        if not (torch.compiler.is_compiling() or _IN_GRAPH):
            raise NotImplementedError("torchair.ops.npu_fused_infer_attention_score_v2 does not support in this "
                                      "mode, only support in max-autotune mode")
        extra["return_softmax_lse"] = return_softmax_lse
        kv_heads = self.torch_npu._fia_static_checks(query, key, value, atten_mask, block_table, learnable_sink,
                                                     num_query_heads, num_key_value_heads, input_layout,
                                                     sparse_mode, block_size, extra)
        for name, lens in (("actual_seq_qlen", actual_seq_qlen), ("actual_seq_kvlen", actual_seq_kvlen)):
            _check(isinstance(lens, torch.Tensor) and lens.dim() == 1 and lens.dtype == torch.int64,
                   f"torchair.ops FIA takes {name} as a 1-D int64 tensor, got {type(lens).__name__}")
        return _fia_v2_tensor(query, key, value, atten_mask, actual_seq_qlen, actual_seq_kvlen, block_table,
                              learnable_sink, kv_heads, float(softmax_scale), int(pre_tokens), int(next_tokens),
                              int(sparse_mode), int(block_size))

    def _cache_compile(self, func, *, config=None, backend=None, dynamic=True, cache_dir=None, global_rank=None,
                       tp_rank=None, pp_rank=None, ge_cache=False, **kwargs):
        """Documented behaviour: `func` is a bound method of an nn.Module; the cache lives at
        {cache_dir}/{Cls}_{static|dynamic}_{md5(module repr, config)}/[world{n}global_rank{r}/]{func}/compiled_module;
        compiled on first call (here: traced by dynamo with the emulated backend), loaded after."""
        _check(inspect.ismethod(func) and isinstance(func.__self__, torch.nn.Module),
               "cache_compile needs a bound method of an nn.Module")
        if config is None:
            config = self.CompilerConfig()
        _check(ge_cache is False or config.mode == "max-autotune", "ge_cache is supported in max-autotune only")
        module = func.__self__
        self.cache_calls.append(dict(func=func, module=module, config=config, dynamic=dynamic, cache_dir=cache_dir,
                                     global_rank=global_rank, tp_rank=tp_rank, pp_rank=pp_rank, ge_cache=ge_cache,
                                     kwargs=kwargs))
        digest = hashlib.md5((repr(module) + repr(sorted(config.as_dict().items()))).encode()).hexdigest()
        root = Path(cache_dir or os.environ.get("TORCHAIR_CACHE_HOME", ".torchair_cache"))
        model_dir = root / f"{type(module).__name__}_{'dynamic' if dynamic else 'static'}_{digest}"
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if global_rank is None else global_rank
            model_dir = model_dir / f"world{dist.get_world_size()}global_rank{rank}"
        path = model_dir / func.__name__ / "compiled_module"
        compiled = torch.compile(func, backend=self.get_npu_backend(compiler_config=config), fullgraph=True,
                                 dynamic=dynamic)
        state = {"done": False}

        def run(*args, **kw):
            if not state["done"]:
                state["event"] = "loaded" if path.is_file() else "compiled"
                if state["event"] == "compiled":
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(pickle.dumps({"name": func.__qualname__, "dynamic": dynamic,
                                                   "ge_cache": ge_cache}))
                self.cache_events.append((state["event"], str(path)))
                state["done"] = True
            if state["event"] == "loaded":  # torchair runs the cached graph without tracing (guards skipped)
                with in_graph():
                    return func(*args, **kw)
            return compiled(*args, **kw)

        run.cache_path = path
        return run


def make_torch_npu(clipped_swiglu: bool = True) -> TorchNpuEmulator:
    return TorchNpuEmulator(clipped_swiglu=clipped_swiglu)


@contextmanager
def installed(clipped_swiglu: bool = True):
    """Put an emulated torch_npu (and torchair) into sys.modules for the duration; restore what was there."""
    npu = make_torch_npu(clipped_swiglu=clipped_swiglu)
    air = TorchairEmulator(npu)
    names = {"torch_npu": npu, "torchair": air, "torchair.ops": air.ops, "torchair.inference": air.inference}
    saved = {n: sys.modules.get(n, _MISSING) for n in names}
    sys.modules.update(names)
    try:
        yield npu, air
    finally:
        for n, old in saved.items():
            if old is _MISSING:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


_MISSING = object()
