"""The `npu` op table: the fused torch_npu ops of the Ascend recipe, with the semantics of model/ops/torch_ops.py.

torch_npu is imported when this table is chosen (`get_ops("npu")`), never before; without it (or without the CANN
toolkit it loads) choosing the table raises `NpuUnavailableError`, which says what to install.

Op by op (docs: Ascend/op-plugin `docs/zh/custom_APIs/torch_npu/<name>.md`; signatures:
`op_plugin/config/op_plugin_functions.yaml`):

- `rms_norm`     -> `npu_rms_norm(x, gamma, epsilon) -> (y, rstd)`; y has x's dtype.
- `add_rms_norm` -> `npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x1 + x2)`; the sum is the new residual.
- `apply_rope`   -> the portable rotation (torch ops; a GE graph fuses the elementwise chain itself).
- `cache_write`  -> `scatter_update_(cache, start, new, axis=1)`: row b of `new` [B, T, H, D] lands at
  `cache[b, start[b]:start[b]+T]`; indices int64 [B]. The op does no bounds check: callers keep start + T <= S.
- `attention`    -> `npu_fused_infer_attention_score_v2` (FIA v2), see below.
- `route`        -> float32 logits, then `npu_moe_gating_top_k_softmax(logits, None, k) -> (w, expert_idx int32,
  row_idx int32)`. It takes softmax over ALL experts, then the top k; GPT-OSS takes the top k logits, then softmax
  over those k. Dividing the k weights by their sum gives exactly the latter (the common softmax denominator
  cancels), so `route` renormalises.
- `moe`          -> `npu_moe_init_routing(x, row_idx, expert_idx, active_num=N) -> (expanded_x [N*k, H] sorted by
  expert, expanded_row_idx int32 [N*k] (source pair k*N+n -> sorted row), expanded_expert_idx int32 [N*k] sorted)`;
  `npu_moe_compute_expert_tokens(expanded_expert_idx, E)` -> int32 [E] CUMULATIVE row ends per expert (an expert
  with no rows repeats the previous end), cast to int64 as `npu_grouped_matmul` wants its `group_list`;
  `npu_grouped_matmul([x], [w [E, K, N]], bias=[b [E, N]], group_list=ends, group_type=0 (split M),
  group_list_type=0 (cumsum), split_item=3 (one output tensor)) -> [y]` for gate_up and down, with the bias in
  float32 when x is bf16/fp32 (the documented combinations; bf16 bias is not accepted); the clamped SwiGLU is
  `npu_clipped_swiglu(x, alpha, limit, bias=1, interleaved=True)` when the installed torch_npu has it (gate = even
  columns, up = odd columns, exactly GPT-OSS), the portable composition otherwise; then
  `npu_moe_finalize_routing(y, None, None, None, scales=w, expanded_src_to_dst_row=expanded_row_idx,
  export_for_source_row=expert_idx, drop_pad_mode=0)` un-permutes and sums the k weighted rows per token.
- `routed_moe`   -> `route`, then `moe` (the layer's one call; on CPU the torch table fuses the two).

Attention (FIA v2), and why this argument combination:

- GPT-OSS needs `learnable_sink` (the per-head sink logit), which FIA v2 documents for input_layout TND or
  NTD_TND only, value D <= 128, unquantised. So queries go in as TND: q [B, T, Hq, D] -> [B*T, Hq, D], with
  `actual_seq_qlen` CUMULATIVE ([T, 2T, ..., BT]; TND requires it and takes the batch count from its length).
- The cache [B, S, Hkv, D] (BSND, written in place) is read as a paged cache, which FIA documents for TND queries
  with key/value laid out (blocknum, blocksize, H=Hkv*D): a contiguous view [B*S/128, 128, Hkv*D] with
  `block_table[b] = b*S/128 + arange(ceil(kv_len/128))` (int32, [B, blocks]) and `block_size=128` (page
  attention with Q_S > 1 wants a multiple of 128 in [128, 512]; the TND rule is 16-aligned and <= 1024; 128
  meets both and is the documented default). With a block table, `actual_seq_kvlen` is the PER-ROW visible
  length (not cumulative), as the seed recipe (cann-recipes-infer models/gpt_oss) and vllm-ascend pass it:
  `q_pos[:, -1] + 1`, clamped to the static `kv_len` (which sizes the block table: a row whose position lies
  beyond it, a finished row the runtime no longer counts, would read past its pages). S must be a multiple of 128.
- Sliding layers list their pages from the one holding the first key the step's first query can see,
  f = max(q_pos[b, 0] - window + 1, 0) // 128, and count keys from there: `block_table[b, i] = b*S/128 +
  (f + i) mod (S/128)`, `actual_seq_kvlen = q_pos[:, -1] + 1 - 128 f`, so key j of the listed sequence is position
  128 f + j. That is what makes a ring cache (position p in slot p mod S, S a multiple of 128) a paged cache in
  position order: its pages are listed oldest first, wrapping round, each once, and no listed slot holds a newer
  position, because the ring is at least window + chunk + 126 slots (graph/shapes.py). A cache longer than the
  context lists the same keys as before from page f on (fewer pages, same result).
- Masks are right-down aligned: query row i of a row with qlen=T and kvlen=L sits at key position L - T + i,
  which is exactly q_pos[b, i] (less 128 f) because the model's positions in a step are start[b] + i. Padding tokens at the
  end of shorter rows are computed like real ones (their outputs are discarded) and real rows never see them.
- Full layers: `sparse_mode=3` (rightDownCausal) with the 2048x2048 compressed mask `~tril` the docs require.
  Sliding layers: `sparse_mode=4` (band, right-down origin), `next_tokens=0`, and `pre_tokens=window-1`: the
  documented band golden (op-plugin `codegen/templates/_op_plugin_docs.py`, npu_fusion_attention: masked =
  triu(next+1) | tril(-pre-1)) keeps keys diag-pre .. diag+next, i.e. pre+1 keys up to the query, while
  GPT-OSS keeps `window` keys (q - k < window). The seed and vllm-ascend pass pre_tokens=window, one key more
  than GPT-OSS; `tools/npu_check.py` measures exactly this boundary on hardware.
- Lengths are built once per step (`attention_lengths`, called by the model before its layers), not per layer:
  in eager mode they are host lists (torch_npu's FIA takes `actual_seq_*` as SymInt[]), so an eager step syncs
  the host once instead of once per layer; in "ge" mode they are tensors for torchair's
  `torchair.ops.npu_fused_infer_attention_score_v2`, which works only inside a GE (max-autotune) graph.
- Every query row sees at least one key: per-row kv lengths are at least the step's query count (with right-down
  alignment a row of T queries and L < T keys would leave T - L rows fully masked, and the kernel computes
  exp(sink - rowmax) with a row max that excludes the sink: inf/NaN), and `kv_len < T` is refused.
- dtype: for TND with head_dim != 512, FIA takes bfloat16 only (op-plugin
  `docs/zh/custom_APIs/torch_npu/torch_npu-npu_fused_infer_attention_score_v2.md`, TND constraints; the PFA tiling
  says "When layout is TND, inputDataType should be bf16"), and `learnable_sink` is read as raw bf16: any other
  dtype is refused here, naming the op, instead of failing (or reading garbage) on the device.

Modes (`get_ops("npu", mode=...)`): "eager" and "ge" (GE graphs, torchair max-autotune). "aclgraph" is refused:
torchair's aclgraph updater refreshes FIA's `actual_seq_qlen/kvlen` at replay only from SymInt graph inputs or
constants (Ascend/torchair `python/torchair/_acl_concrete_graph/acl_graph.py`, get_update_ruler: "For updated param
value only sym and constant is supported"), and capture forbids the host sync that eager lengths need; the model's
entry points take positions as tensors, so lengths computed from them would be frozen at their capture values.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .torch_ops import apply_rope, clamped_swiglu, linear  # noqa: F401  (apply_rope, linear: this table's too)

BLOCK_SIZE = 128
INT32_MAX = 2**31 - 1
_MASK_SIZE = 2048
_masks: dict = {}
MODES = ("eager", "ge")
TND_DTYPE = torch.bfloat16


class NpuUnavailableError(ImportError):
    """The npu op table was chosen but torch_npu (or the CANN toolkit it needs) cannot be imported."""


def _npu():
    """torch_npu, imported on first use."""
    mod = sys.modules.get("torch_npu")
    if mod is None:
        try:
            import torch_npu as mod  # noqa: F811
        except Exception as e:  # ModuleNotFoundError, or ImportError/OSError when CANN's libraries are missing
            raise NpuUnavailableError(
                "the 'npu' op table needs torch_npu and the Ascend CANN toolkit: install CANN, `source "
                "/usr/local/Ascend/ascend-toolkit/set_env.sh`, then `pip install -e '.[npu]'` (torch_npu matching "
                f"torch {torch.__version__.split('+')[0]}). Importing torch_npu failed: {e}") from e
    return mod


def _torchair():
    """torchair ships inside torch_npu; importing torch_npu registers it as `torchair`."""
    _npu()
    mod = sys.modules.get("torchair")
    if mod is None:
        import torchair as mod  # noqa: F811
    return mod


_npu()  # choosing this table without torch_npu fails here, at model construction


def check_mode(mode: str) -> None:
    if mode == "aclgraph":
        raise ValueError(
            "the npu op table has no 'aclgraph' mode: torchair's aclgraph (npugraph_ex) updater refreshes FIA's "
            "actual_seq_qlen/actual_seq_kvlen at replay only from SymInt graph inputs or constants, and capture "
            "forbids the host sync (.tolist()) eager lengths need; this model's lengths are computed from position "
            "tensors inside the graph and would stay frozen at their capture values. Use mode 'ge' (torchair "
            "max-autotune) or 'eager'")


def _causal_mask(device) -> torch.Tensor:
    """The 2048x2048 compressed mask sparse modes 2-4 take: True above the diagonal (masked). Inside a graph it is
    built in the graph (a constant the compiler folds); eagerly once per device."""
    if torch.compiler.is_compiling():
        return ~torch.tril(torch.ones(_MASK_SIZE, _MASK_SIZE, dtype=torch.bool, device=device))
    key = str(device)
    mask = _masks.get(key)
    if mask is None:
        mask = ~torch.tril(torch.ones(_MASK_SIZE, _MASK_SIZE, dtype=torch.bool, device=device))
        _masks[key] = mask
    return mask


# -- norms ----------------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _npu().npu_rms_norm(x, weight, epsilon=eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual)."""
    y, _, summed = _npu().npu_add_rms_norm(x, residual, weight, epsilon=eps)
    return y, summed


# -- KV cache and attention -----------------------------------------------------------------------------------------
def cache_write(cache: torch.Tensor, start: torch.Tensor, new: torch.Tensor) -> None:
    """In place: cache[b, (start[b] + t) mod S] = new[b, t], as one contiguous write at start[b] mod S: the runtime
    starts a multi-token step at a multiple of its chunk and sizes a ring as a multiple of the chunk, so a step
    never wraps (graph/shapes.py; the op itself does no bounds check)."""
    start = torch.remainder(start.to(torch.int64), cache.shape[1])
    _npu().scatter_update_(cache, start, new, 1)


@dataclass
class AttentionLengths:
    """What FIA needs per step beyond q/k/v, shared by every layer of one cache layout: cumulative query ends,
    per-row visible key counts (host lists in eager mode, int64 tensors in GE graphs) and the block table."""
    q_ends: list | torch.Tensor
    kv_lens: list | torch.Tensor
    block_table: torch.Tensor


def _layout_lengths(q_pos: torch.Tensor, kv_len: int, slots: int, window: int):
    """Block table [B, pages] int32 and per-row key counts [B] int64 of one cache layout (see the module docstring:
    a sliding layer's keys are listed from the page holding the first key its step can see)."""
    batch, steps = q_pos.shape
    if slots % BLOCK_SIZE:
        raise ValueError(f"the npu attention reads the KV cache as {BLOCK_SIZE}-slot pages: the cache has {slots} "
                         f"slots, not a multiple of {BLOCK_SIZE} (raise max_seq_len or the prefill chunk)")
    visible = min(kv_len, slots)
    if visible < steps:
        raise ValueError(f"npu attention: kv_len={kv_len} (cache {slots} slots) is less than the {steps} queries of "
                         f"this step: the first rows would see no key at all (fully masked rows give inf/NaN in "
                         f"npu_fused_infer_attention_score_v2 with a learnable_sink)")
    dev = q_pos.device
    per_row, blocks = slots // BLOCK_SIZE, -(-visible // BLOCK_SIZE)
    pages = torch.arange(blocks, device=dev, dtype=torch.int64)
    end = q_pos[:, -1].to(torch.int64)
    if window > 0:  # the page of the step's first visible key; a ring wraps at a page boundary (slots % 128 == 0)
        first = (q_pos[:, 0].to(torch.int64) - (window - 1)).clamp(min=0) // BLOCK_SIZE
        pages = torch.remainder(first[:, None] + pages, per_row)
        end = end - first * BLOCK_SIZE
    block_table = (torch.arange(batch, device=dev, dtype=torch.int64)[:, None] * per_row + pages).to(torch.int32)
    # at least `steps` keys per row (no fully masked row), at most the block table's: the runtime sizes kv_len for
    # the rows still generating; a finished row idling past it would otherwise read beyond its block table (its
    # output is discarded; clamped, it stays finite)
    return block_table, (end + 1).clamp(min=steps, max=visible)


def attention_lengths(q_pos: torch.Tensor, kv_len: int, layouts, *, mode: str = "eager") -> dict:
    """Built once per step from the positions q_pos [B, T], for each cache layout (slots, window) the layers use;
    see the module docstring. Eager mode syncs the host once for all layouts."""
    batch, steps = q_pos.shape
    layouts = list(layouts)
    tables, kv_lens = zip(*(_layout_lengths(q_pos, kv_len, slots, window) for slots, window in layouts))
    if mode == "ge":
        q_ends = torch.arange(1, batch + 1, device=q_pos.device, dtype=torch.int64) * steps
        return {lay: AttentionLengths(q_ends, kv, table) for lay, kv, table in zip(layouts, kv_lens, tables)}
    q_ends = [steps * (b + 1) for b in range(batch)]
    host = torch.stack(kv_lens).tolist()  # one sync per step
    return {lay: AttentionLengths(q_ends, kv, table) for lay, kv, table in zip(layouts, host, tables)}


def attention_skips_unseen_slots(device_type: str, dtype: torch.dtype) -> bool:
    """See torch_ops: no here. The fused attention reads the kv_len slots it is given (their pages), seen or not."""
    return False


def attention(q, k_cache, v_cache, sinks, q_pos, window: int, scale: float, kv_len: int,
              lengths: AttentionLengths | None = None, *, mode: str = "eager") -> torch.Tensor:
    """See torch_ops.attention. q [B, T, Hq, D] at positions q_pos [B, T] (consecutive within a row); cache
    [B, S, Hkv, D] (a ring, as in torch_ops) with S a multiple of 128; `lengths`: this layout's entry of
    attention_lengths (built here when not given).
    Returns [B, T, Hq, D]."""
    batch, steps, q_heads, dim = q.shape
    slots, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if q.dtype != TND_DTYPE or k_cache.dtype != TND_DTYPE:
        raise TypeError(f"npu attention: npu_fused_infer_attention_score_v2 with input_layout TND (the only layout "
                        f"that takes learnable_sink) accepts bfloat16 only (op-plugin FIA v2 docs, TND "
                        f"constraints; learnable_sink is read as raw bf16); got query {q.dtype}, cache "
                        f"{k_cache.dtype}. Load the model with dtype=torch.bfloat16")
    if lengths is None:
        lengths = attention_lengths(q_pos, kv_len, [(slots, window)], mode=mode)[(slots, window)]
    key = k_cache.view(-1, BLOCK_SIZE, kv_heads * dim)
    value = v_cache.view(-1, BLOCK_SIZE, kv_heads * dim)
    if window > 0:
        sparse_mode, pre_tokens = 4, window - 1
    else:
        sparse_mode, pre_tokens = 3, INT32_MAX
    fia = _torchair().ops if mode == "ge" else _npu()
    out, _ = fia.npu_fused_infer_attention_score_v2(
        q.reshape(batch * steps, q_heads, dim), key, value, atten_mask=_causal_mask(q.device),
        actual_seq_qlen=lengths.q_ends, actual_seq_kvlen=lengths.kv_lens, block_table=lengths.block_table,
        learnable_sink=sinks.to(TND_DTYPE), num_query_heads=q_heads, num_key_value_heads=kv_heads,
        softmax_scale=scale, pre_tokens=pre_tokens, next_tokens=0, input_layout="TND", sparse_mode=sparse_mode,
        block_size=BLOCK_SIZE)
    return out.view(batch, steps, q_heads, dim)


# -- MoE ------------------------------------------------------------------------------------------------------------
def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int):
    """Top-k of the logits, softmax over those k. Returns (weights [N, k] float32, expert ids [N, k] int32)."""
    logits = F.linear(x.float(), weight.float(), bias.float())  # fp32 into the gating op: one rounding, not two
    probs, experts, _ = _npu().npu_moe_gating_top_k_softmax(logits, None, k=top_k)
    return probs / probs.sum(dim=-1, keepdim=True), experts


def _bias_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float16 if x.dtype == torch.float16 else torch.float32


def _swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    npu = _npu()
    if hasattr(npu, "npu_clipped_swiglu"):
        return npu.npu_clipped_swiglu(h, dim=-1, alpha=alpha, limit=limit, bias=1.0, interleaved=True)
    return clamped_swiglu(h, alpha, limit)


def moe(x, weights, experts, gate_up, gate_up_bias, down, down_bias, alpha: float, limit: float) -> torch.Tensor:
    """See torch_ops.moe. x [N, H]; weights/experts [N, k]; gate_up [E, H, 2I]; down [E, I, H]."""
    npu = _npu()
    tokens, top_k = experts.shape
    num_experts = gate_up.shape[0]
    expert_idx = experts.to(torch.int32)
    # row_idx[n, j] = j*N + n: the pair numbering npu_moe_gating_top_k_softmax also returns
    row_idx = torch.arange(tokens * top_k, device=x.device, dtype=torch.int32).view(top_k, tokens).t().contiguous()
    rows, src_to_dst, sorted_experts = npu.npu_moe_init_routing(x, row_idx, expert_idx, active_num=tokens)
    ends = npu.npu_moe_compute_expert_tokens(sorted_experts, num_experts).to(torch.int64)
    bias_dtype = _bias_dtype(x)
    h = npu.npu_grouped_matmul([rows], [gate_up], bias=[gate_up_bias.to(bias_dtype)], group_list=ends,
                               split_item=3, group_type=0, group_list_type=0)[0]
    h = _swiglu(h, alpha, limit)
    y = npu.npu_grouped_matmul([h], [down], bias=[down_bias.to(bias_dtype)], group_list=ends,
                               split_item=3, group_type=0, group_list_type=0)[0]
    return npu.npu_moe_finalize_routing(y, None, None, None, weights.to(y.dtype), src_to_dst, expert_idx,
                                        drop_pad_mode=0)


def routed_moe(x, router_weight, router_bias, top_k: int, gate_up, gate_up_bias, down, down_bias, alpha: float,
               limit: float) -> torch.Tensor:
    """`route`, then `moe` (the gating op's output feeds init_routing directly)."""
    weights, experts = route(x, router_weight, router_bias, top_k)
    return moe(x, weights, experts, gate_up, gate_up_bias, down, down_bias, alpha, limit)
