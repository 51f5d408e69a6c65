"""The portable op table: plain torch, runs on CPU and CUDA, and is the specification the fused NPU ops are
held to. Every function takes static shapes and carries lengths and positions as tensor values.

Weights come in the form the model holds them (model/weights.py): a dense tensor in the activations' dtype, a
bf16 tensor next to fp32 activations, or packed MXFP4 experts. `linear` and the expert matmuls pick the kernel
from that form: the CPU kernels of model/kernels for the published forms, torch's own ops otherwise."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels import (bf16_linear, decode_attention, mxfp4_grouped_mm, mxfp4_moe, mxfp4_moe_routed,
                       prefill_attention)
from ..weights import PackedMxfp4
from .grouped_mm import grouped_mm


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b for W [out, in] in its stored dtype. bf16 W with fp32 x on CPU: the bf16 kernel (W is read as
    stored, products and sums in fp32); same dtypes: torch's linear."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if weight.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.device.type == "cpu":
        y = bf16_linear(x.reshape(-1, x.shape[-1]), weight, None if bias is None else bias.float())
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight.to(x.dtype), bias)


def _one_call(*tensors: torch.Tensor) -> bool:
    """Whether the small per-layer ops take the CPU kernels' single calls (model/kernels: rms_norm, add_rms_norm,
    rope, cache_write): fp32 on the CPU, run eagerly. Eagerly each torch form is 6-10 ATen calls, 18-19 us a call
    at batch 8 on a 2-core VM against 4-8 us for the kernel; a graph being compiled keeps the torch forms, which the
    compiler fuses with their neighbours."""
    for t in tensors:  # (a loop and `is_cpu`: 1.5 us a call; all() over `t.device` took 4.3-4.8)
        if not t.is_cpu or t.dtype is not torch.float32:
            return False
    return not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _one_call(x, weight):
        return kernels.rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual): the sum becomes the new residual stream."""
    if _one_call(x, residual, weight) and x.shape == residual.shape:
        return kernels.add_rms_norm(x, residual, weight, eps)
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [B, T, D/2]. Half-split rotation."""
    if _one_call(x, cos, sin):
        return kernels.rope(x, cos, sin)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def cache_write(cache: torch.Tensor, start: torch.Tensor, new: torch.Tensor) -> None:
    """In place: cache[b, (start[b] + t) mod S] = new[b, t] for every row b. A cache of S slots is a ring: position
    p lives in slot p mod S (a cache longer than the context never wraps, and is the plain linear cache).
    cache [B, S, H, D], start [B] int, new [B, T, H, D]."""
    if _one_call(cache, new) and start.device.type == "cpu" and cache.is_contiguous():
        kernels.cache_write(cache, start, new)
        return
    batch, steps = new.shape[:2]
    rows = torch.arange(batch, device=new.device)[:, None].expand(batch, steps)
    cols = torch.remainder(start[:, None].to(torch.long) + torch.arange(steps, device=new.device), cache.shape[1])
    cache.index_put_((rows, cols), new)


def slot_positions(q_pos: torch.Tensor, kv_len: int, slots: int) -> torch.Tensor:
    """The true position held by each of the first min(kv_len, slots) slots of a ring of `slots`, once the step
    writing up to q_pos[:, -1] has written: the latest p <= that end with p = slot (mod slots); negative where no
    such position was written yet. [B, n] int64. In a cache longer than the context this is the slot index (or
    negative beyond the end), so a linear cache reads exactly as before."""
    end = q_pos[:, -1:].to(torch.long)
    slot = torch.arange(min(kv_len, slots), device=q_pos.device)
    return end - torch.remainder(end - slot, slots)


def attention_lengths(q_pos: torch.Tensor, kv_len: int, layouts) -> dict:
    """What attention needs per step beyond positions, computed once for all layers: for each cache layout
    (slots, window) the layers use, the slot positions (see `slot_positions`)."""
    return {(slots, window): slot_positions(q_pos, kv_len, slots) for slots, window in layouts}


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    q_pos: torch.Tensor,
    window: int,
    scale: float,
    kv_len: int,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (or sliding-band) GQA attention with a learned per-head sink logit.

    q [B, T, Hq, D] at positions q_pos [B, T] (consecutive within a row); keys/values are the first
    min(kv_len, S) slots of the cache [B, S, Hkv, D], a ring whose slot s holds the position `slot_positions` gives
    (`kv_len` is static; a linear cache is a ring that never wrapped). Each key is masked by its true position:
    not yet written, above q_pos, or (window > 0) at or below q_pos - window. `lengths`: this layout's entry of
    `attention_lengths` (computed here when not given). The sink joins each head's softmax as one more logit and is
    then dropped. Returns [B, T, Hq, D].

    On CPU in fp32 the project's kernels read the cache in place: single-token steps kernels.decode_attention
    (each visible slot read once for all the heads that share it), chunks kernels.prefill_attention (tiles of
    query rows against blocks of keys, the blocks no row sees skipped); other dtypes take ATen's fused kernel
    (`attention_flash_cpu`). Elsewhere `attention_by_ops`.
    """
    k_pos = slot_positions(q_pos, kv_len, k_cache.shape[1]) if lengths is None else lengths  # [B, n]
    if q.device.type == "cpu":
        if attention_skips_unseen_slots(q.device.type, q.dtype) and k_cache.dtype == q.dtype:
            kernel = decode_attention if q.shape[1] == 1 else prefill_attention
            return kernel(q, k_cache, v_cache, sinks, k_pos, q_pos, window, scale)
        return attention_flash_cpu(q, k_cache, v_cache, sinks, q_pos, window, scale, k_pos)
    return attention_by_ops(q, k_cache, v_cache, sinks, q_pos, window, scale, k_pos)


def attention_skips_unseen_slots(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `attention` on this device and dtype costs only the slots a query sees, whatever kv_len: the CPU
    kernels (fp32 on CPU) skip the rest, so a step may read the whole cache (runtime.settings: kv_buckets)."""
    return device_type == "cpu" and dtype == torch.float32


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[B, T, n]: whether the key in slot j is visible to the query at q_pos[b, t]: written, not above it, and
    (window > 0) within the window."""
    k_pos = k_pos[:, None, :]
    visible = (k_pos <= q_pos[..., None]) & (k_pos >= 0)
    if window > 0:
        visible = visible & (k_pos > q_pos[..., None] - window)
    return visible


def _group_rows(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, T, Hq, D] -> [B, Hkv, G*T, D]: a kv head's G query heads as G*T rows (row g*T + t), so its keys and
    values are read as they are, not broadcast (and copied) G times."""
    batch, steps, q_heads, dim = q.shape
    group = q_heads // kv_heads
    return q.view(batch, steps, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * steps,
                                                                                      dim)


def _ungroup_rows(out: torch.Tensor, steps: int) -> torch.Tensor:
    """The inverse of `_group_rows`: [B, Hkv, G*T, D] -> [B, T, Hq, D]."""
    batch, kv_heads, rows, dim = out.shape
    group = rows // steps
    return out.view(batch, kv_heads, group, steps, dim).permute(0, 3, 1, 2, 4).reshape(batch, steps,
                                                                                       kv_heads * group, dim)


def attention_by_ops(q, k_cache, v_cache, sinks, q_pos, window: int, scale: float, k_pos) -> torch.Tensor:
    """`attention` as tensor ops (any device and dtype), given the slot positions k_pos [B, n]."""
    batch, steps, q_heads, _ = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    n = k_pos.shape[1]
    k = k_cache[:, :n].permute(0, 2, 1, 3)  # [B, Hkv, S, D]
    v = v_cache[:, :n].permute(0, 2, 1, 3)
    scores = (torch.matmul(_group_rows(q, kv_heads), k.transpose(-1, -2)) * scale).view(batch, kv_heads, group,
                                                                                         steps, n)
    scores = scores.masked_fill(~_visible(q_pos, k_pos, window)[:, None, None], float("-inf"))
    sink = sinks.to(scores.dtype).view(1, kv_heads, group, 1, 1).expand(batch, -1, -1, steps, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    out = torch.matmul(probs.to(v.dtype).reshape(batch, kv_heads, group * steps, n), v)  # [B, Hkv, G*T, D]
    return _ungroup_rows(out, steps)


def attention_flash_cpu(q, k_cache, v_cache, sinks, q_pos, window: int, scale: float, k_pos) -> torch.Tensor:
    """`attention` through ATen's fused CPU kernel, which never forms the scores as a tensor and returns each
    row's log-sum-exp over its visible keys: the sink then joins the softmax exactly as
    out * Z / (Z + e^sink) = out * sigmoid(lse - sink). Prefill chunks of 64-256 rows against 256-2048 keys took
    0.24-0.64x the time of `attention_by_ops` (bench heads, two threads, Zen 4 AVX2)."""
    batch, steps, q_heads, _ = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    n = k_pos.shape[1]
    k = k_cache[:, :n].permute(0, 2, 1, 3)  # [B, Hkv, S, D]
    v = v_cache[:, :n].permute(0, 2, 1, 3)
    # one additive mask for all kv heads, its T rows repeated for the group's G heads (rows g*T + t)
    mask = torch.zeros(batch, steps, n, dtype=q.dtype, device=q.device)
    mask = mask.masked_fill_(~_visible(q_pos, k_pos, window), float("-inf"))[:, None].repeat(1, 1, group, 1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _group_rows(q, kv_heads), k, v, 0.0, False, attn_mask=mask, scale=scale)
    sink = sinks.to(lse.dtype).view(1, kv_heads, group, 1).expand(batch, -1, -1, steps).reshape(lse.shape)
    return _ungroup_rows(out * torch.sigmoid(lse - sink)[..., None].to(out.dtype), steps)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int):
    """Router: top-k of the logits, softmax over those k. Returns (weights [N, k], expert ids [N, k])."""
    logits = linear(x, weight, bias)
    top_logits, experts = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top_logits, dim=-1), experts


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS activation on interleaved [gate0, up0, gate1, up1, ...] columns."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def expert_matmul(x: torch.Tensor, w, offs: torch.Tensor, bias: torch.Tensor,
                  row_experts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert (`offs`: cumulative row ends; `row_experts`: each row's expert) times their
    expert's weight, plus its bias. `w`: dense [E, in, out], or PackedMxfp4 (the kernel adds the bias)."""
    if isinstance(w, PackedMxfp4):
        if any(w.pad):
            x = F.pad(x, w.pad)  # onto the block grid; the codes outside this rank's slice are zero
        return mxfp4_grouped_mm(x, w.blocks, w.scales, offs, bias.float())
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    return grouped_mm(x, w, offs) + bias[row_experts]


def moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up,
    gate_up_bias: torch.Tensor,
    down,
    down_bias: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Routed experts only: the N*k (token, expert) rows are sorted by expert, each expert multiplies its
    contiguous rows (grouped matmul), then rows are weighted and summed back per token.

    x [N, H]; weights/experts [N, k]; gate_up [E, H, 2I]; down [E, I, H] (or packed, see expert_matmul).
    Returns [N, H] (partial sum under tensor parallelism: the caller all-reduces)."""
    if isinstance(gate_up, PackedMxfp4) and x.dtype == torch.float32:  # published weights: one kernel call
        return mxfp4_moe(x, weights, experts, gate_up.blocks, gate_up.scales, gate_up_bias, down.blocks,
                         down.scales, down_bias, down.pad[0], alpha, limit)
    return moe_by_ops(x, weights, experts, gate_up, gate_up_bias, down, down_bias, alpha, limit)


def routed_moe(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, top_k: int, gate_up,
               gate_up_bias: torch.Tensor, down, down_bias: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """`route`, then `moe`. Published weights on CPU (MXFP4 experts, bf16 router, fp32 activations): one kernel
    call for the layer, with the same logits as `route`'s (the bf16 linear's) and the same expert order."""
    if (isinstance(gate_up, PackedMxfp4) and x.dtype == torch.float32 and router_weight.dtype == torch.bfloat16
            and x.device.type == "cpu"):
        return mxfp4_moe_routed(x, router_weight, router_bias, top_k, gate_up.blocks, gate_up.scales,
                                gate_up_bias, down.blocks, down.scales, down_bias, down.pad[0], alpha, limit)
    weights, experts = route(x, router_weight, router_bias, top_k)
    return moe(x, weights, experts, gate_up, gate_up_bias, down, down_bias, alpha, limit)


def moe_by_ops(x, weights, experts, gate_up, gate_up_bias, down, down_bias, alpha: float, limit: float):
    """`moe` as separate tensor ops (any weight form, any dtype)."""
    tokens, top_k = experts.shape
    num_experts = gate_up_bias.shape[0]
    flat_experts = experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)  # row r of the sorted list is pair order[r]
    sorted_experts = flat_experts[order]
    token_of_row = order // top_k
    # each expert's cumulative row end: one small serial op (a scatter-add of counts then a cumsum took
    # several, and CPU scatter_add_ may open a parallel region, which costs a time slice on a loaded machine)
    expert_ids = torch.arange(num_experts, device=x.device, dtype=sorted_experts.dtype)
    offs = torch.searchsorted(sorted_experts, expert_ids, right=True, out_int32=True)

    rows = x[token_of_row]
    h = expert_matmul(rows, gate_up, offs, gate_up_bias, sorted_experts)
    h = clamped_swiglu(h, alpha, limit)
    y = expert_matmul(h, down, offs, down_bias, sorted_experts)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_row, y)
