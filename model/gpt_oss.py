"""GPT-OSS (OpenAI, 2025) as static-shape entry points over a static KV cache.

    h_0        = Embed(ids)
    a_l        = Attn_l(RMSNorm(h_l))                          GQA + learned sinks; sliding band on even layers
    h_l'       = h_l + AllReduce(a_l)
    h_{l+1}    = h_l' + AllReduce(MoE_l(RMSNorm(h_l')))         top-k router, clamped SwiGLU experts
    logits     = Gather(LMHead(RMSNorm(h_L)))

`prefill` runs a chunk of T tokens per sequence starting at `start[b]` and returns the logits at each row's
`last[b]`; `decode` runs one token per sequence at `pos[b]`; `mixed` runs both in one step (decode rows and one
prompt's chunk, each over its own cache rows), so a serving step reads the weights once. All write K/V into the
cache in place. Inside, a step is a list of `Tokens` parts: everything but attention runs on all their tokens at
once, attention per part.

A layer's cache of S slots is a ring (position p in slot p mod S): sliding layers may get one just longer than
their window plus a chunk, full layers one longer than the context (which never wraps: the plain linear cache).
Positions travel as tensor values, never as Python ints, so every entry point can be captured as graphs with
static shapes; the only Python int they take, `kv_len` (how many cache slots attention reads), is a per-graph
constant.
Everything backend-specific is behind `self.ops`; everything tensor-parallel is in `self.plan`/`self.parallel`;
how weights are held (`self.weights`: "dense" or "published", see weights.py) only the op table sees.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from .config import GptOssConfig
from .ops import get_ops
from .parallel import Parallel, ShardPlan
from .rope import rope_cos_sin, yarn_inv_freq
from .mxfp4 import BLOCK_SIZE
from .weights import WEIGHT_FORMATS, Linear, PackedMxfp4, block_span, frozen


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, plan: ShardPlan, layer: int, ops):
        super().__init__()
        self.ops = ops
        self.q_heads, self.kv_heads, self.head_dim = plan.q_heads, plan.kv_heads, config.head_dim
        width = (plan.q_heads + 2 * plan.kv_heads) * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, width, ops)  # merged q, k, v
        self.o_proj = Linear(plan.q_heads * config.head_dim, config.hidden_size, ops)  # row-parallel
        self.sinks = nn.Parameter(torch.zeros(plan.q_heads))
        self.window = config.sliding_window if config.is_sliding(layer) else 0
        self.scale = config.head_dim ** -0.5

    def forward(self, x, parts: list["Tokens"], layer: int, kv_len: int):
        """x [N, hidden]: the step's tokens, part after part (each part's B x T tokens row-major)."""
        qkv, outs, offset = self.qkv_proj(x), [], 0
        for p in parts:
            batch, steps = p.positions.shape
            rows = qkv[offset:offset + batch * steps].view(batch, steps, -1)
            offset += batch * steps
            q, k, v = rows.split([self.q_heads * self.head_dim, self.kv_heads * self.head_dim,
                                  self.kv_heads * self.head_dim], dim=-1)
            q = self.ops.apply_rope(q.reshape(batch, steps, self.q_heads, self.head_dim), p.cos, p.sin)
            k = self.ops.apply_rope(k.reshape(batch, steps, self.kv_heads, self.head_dim), p.cos, p.sin)
            self.ops.cache_write(p.keys[layer], p.start, k)
            self.ops.cache_write(p.values[layer], p.start, v.reshape(batch, steps, self.kv_heads, self.head_dim))
            out = self.ops.attention(q, p.keys[layer], p.values[layer], self.sinks, p.positions, self.window,
                                     self.scale, p.kv_len or kv_len, p.lengths[layer])
            outs.append(out.reshape(batch * steps, -1))
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))


class Tokens(NamedTuple):
    """One part of a step: B rows of T consecutive positions each, written to and read from their own cache rows
    (`keys`/`values`: per layer, [B, S, Hkv, D] views of the cache)."""
    ids: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    start: torch.Tensor  # [B]: positions[:, 0]
    keys: list
    values: list
    cos: torch.Tensor | None = None  # rope tables and per-layer attention lengths, filled in by GptOss.hidden
    sin: torch.Tensor | None = None
    lengths: list | None = None
    kv_len: int | None = None  # cache slots this part's attention reads (None: the step's kv_len)


class MoE(nn.Module):
    """Experts hold this rank's slice of the intermediate dimension: gate_up columns (gate/up pairs kept
    together), down rows. The output is a partial sum under TP.

    Expert weights are dense, `gate_up_proj [E, H, 2I]` and `down_proj [E, I, H]`, or packed MXFP4 as published
    (`packed=True`): `*_blocks`/`*_scales` of the transposed [E, out, in] matrices, down's input slice covered by
    whole blocks (see PackedMxfp4)."""

    def __init__(self, config: GptOssConfig, plan: ShardPlan, ops, packed: bool = False):
        super().__init__()
        self.ops, self.top_k = ops, config.num_experts_per_tok
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        experts, hidden, inter = config.num_local_experts, config.hidden_size, plan.intermediate
        self.router = Linear(hidden, experts, ops)
        self.packed = packed
        if packed:
            first, end, before, after = block_span(plan.intermediate_start, inter)
            self.down_pad = (before, after)
            self.gate_up_blocks = frozen(experts, 2 * inter, hidden // BLOCK_SIZE, 16, dtype=torch.uint8)
            self.gate_up_scales = frozen(experts, 2 * inter, hidden // BLOCK_SIZE, dtype=torch.uint8)
            self.down_blocks = frozen(experts, hidden, end - first, 16, dtype=torch.uint8)
            self.down_scales = frozen(experts, hidden, end - first, dtype=torch.uint8)
        else:
            self.gate_up_proj = frozen(experts, hidden, 2 * inter)
            self.down_proj = frozen(experts, inter, hidden)
        self.gate_up_proj_bias = frozen(experts, 2 * inter)
        self.down_proj_bias = frozen(experts, hidden)

    def gate_up(self):
        return PackedMxfp4(self.gate_up_blocks, self.gate_up_scales, (0, 0)) if self.packed else self.gate_up_proj

    def down(self):
        return PackedMxfp4(self.down_blocks, self.down_scales, self.down_pad) if self.packed else self.down_proj

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        y = self.ops.routed_moe(x, self.router.weight, self.router.bias, self.top_k, self.gate_up(),
                                self.gate_up_proj_bias, self.down(), self.down_proj_bias, self.alpha, self.limit)
        return y.view(shape)


class Block(nn.Module):
    def __init__(self, config: GptOssConfig, plan: ShardPlan, layer: int, ops, packed: bool):
        super().__init__()
        self.input_layernorm = nn.Parameter(torch.ones(config.hidden_size))
        self.self_attn = Attention(config, plan, layer, ops)
        self.post_attention_layernorm = nn.Parameter(torch.ones(config.hidden_size))
        self.mlp = MoE(config, plan, ops, packed)


class GptOss(nn.Module):
    """`weights`: "dense" or "published" (weights.py); `packed_experts`: MXFP4 experts stay packed (published
    weights of an MXFP4 checkpoint); `ops_mode`: how the op table runs (e.g. "ge": lengths as tensors)."""

    def __init__(self, config: GptOssConfig, parallel: Parallel = Parallel(), ops: str = "torch",
                 ops_mode: str = "eager", weights: str = "dense", packed_experts: bool = False):
        super().__init__()
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format '{weights}'; available: {list(WEIGHT_FORMATS)}")
        self.config, self.parallel, self.weights = config, parallel, weights
        self.plan = ShardPlan.build(config, parallel)
        self.ops = get_ops(ops, ops_mode)
        self.ops_name, self.ops_mode = ops, ops_mode
        self.embed_tokens = nn.Parameter(torch.zeros(self.plan.vocab, config.hidden_size))  # vocab-parallel
        self.layers = nn.ModuleList(Block(config, self.plan, i, self.ops, packed_experts)
                                    for i in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Parameter(torch.zeros(self.plan.vocab, config.hidden_size))  # vocab-parallel
        inv_freq, self.rope_scale = yarn_inv_freq(config.head_dim, config.rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV cache's) dtype: norm weights are held in it in every weight format."""
        return self.norm.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.device

    # -- pieces -------------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(ids, self.embed_tokens).to(self.dtype)
        local = ids - self.plan.vocab_start
        owned = (local >= 0) & (local < self.plan.vocab)
        rows = F.embedding(torch.where(owned, local, torch.zeros_like(local)), self.embed_tokens).to(self.dtype)
        return self.parallel.all_reduce(rows * owned[..., None].to(rows.dtype))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.ops.linear(h, self.lm_head, None)
        return self.parallel.all_gather_last_dim(logits)[..., : self.config.vocab_size]

    def hidden(self, parts: list[Tokens], kv_len: int) -> torch.Tensor:
        """Final-normed hidden states [N, H] of the step's tokens, part after part (each part's [B, T] row-major);
        writes each layer's cache at `start[b] + t` (mod its slot count) of each part's rows."""
        ops, eps = self.ops, self.config.rms_norm_eps
        ready = []
        for p in parts:
            cos, sin = rope_cos_sin(p.positions, self.inv_freq, self.rope_scale, self.dtype)
            # once per step and part, not per layer: one entry per cache layout (ring or linear, band or causal)
            layouts = [(k.shape[1], block.self_attn.window) for k, block in zip(p.keys, self.layers)]
            by_layout = ops.attention_lengths(p.positions, p.kv_len or kv_len, sorted(set(layouts)))
            ready.append(p._replace(cos=cos, sin=sin, lengths=[by_layout[lay] for lay in layouts]))
        ids = [p.ids.reshape(-1) for p in parts]
        residual = self.embed(ids[0] if len(ids) == 1 else torch.cat(ids))
        h = ops.rms_norm(residual, self.layers[0].input_layernorm, eps)
        for i, block in enumerate(self.layers):
            a = block.self_attn(h, ready, i, kv_len)
            h, residual = ops.add_rms_norm(self.parallel.all_reduce(a), residual, block.post_attention_layernorm, eps)
            m = self.parallel.all_reduce(block.mlp(h))
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, residual = ops.add_rms_norm(m, residual, next_norm, eps)
        return h

    # -- entry points (the only functions graph/ captures) ------------------------------------------------
    def prefill(self, ids, start, last, k_caches, v_caches, kv_len: int) -> torch.Tensor:
        """ids [B, T] at positions start[b] + t; returns logits [B, vocab] at token index last[b]."""
        h = self.hidden([self._chunk(ids, start, k_caches, v_caches)], kv_len)
        return self.logits(self._at(h.view(*ids.shape, -1), last))

    def decode(self, ids, pos, k_caches, v_caches, kv_len: int) -> torch.Tensor:
        """ids [B] at positions pos [B]; returns logits [B, vocab]."""
        return self.logits(self.hidden([Tokens(ids[:, None], pos[:, None], pos, k_caches, v_caches)], kv_len))

    def mixed(self, ids, pos, k_caches, v_caches, chunk_ids, start, last, chunk_k_caches, chunk_v_caches,
              kv_len: int) -> torch.Tensor:
        """`decode(ids, pos, k_caches, v_caches)` and `prefill(chunk_ids, start, last, chunk_k_caches, ...)` as one
        step over disjoint cache rows: returns logits [B + chunk rows, vocab], the decode rows' then the chunk's.
        `kv_len` is the chunk's; the decode rows read their whole cache (a single-token step's attention costs what
        its visible keys cost on CPU), so the chunk never attends over slots only a decode row needs."""
        whole = max(k.shape[1] for k in k_caches)
        parts = [Tokens(ids[:, None], pos[:, None], pos, k_caches, v_caches, kv_len=whole),
                 self._chunk(chunk_ids, start, chunk_k_caches, chunk_v_caches)]
        h = self.hidden(parts, kv_len)
        batch = ids.shape[0]
        return self.logits(torch.cat((h[:batch], self._at(h[batch:].view(*chunk_ids.shape, -1), last))))

    def prefill_scored(self, ids, start, k_caches, v_caches, kv_len: int) -> torch.Tensor:
        """`prefill` with logits at every token of the chunk: [B, T, vocab] (a prompt's log-probabilities). Not an
        entry point: it runs as Python on every backend, for the requests that ask."""
        h = self.hidden([self._chunk(ids, start, k_caches, v_caches)], kv_len)
        return self.logits(h).view(*ids.shape, -1)

    @staticmethod
    def _chunk(ids, start, k_caches, v_caches) -> Tokens:
        positions = start[:, None] + torch.arange(ids.shape[1], device=ids.device)
        return Tokens(ids, positions, start, k_caches, v_caches)

    @staticmethod
    def _at(h, last):
        """h [B, T, H] at token index last[b] of each row: [B, H]."""
        return h.gather(1, last.view(-1, 1, 1).expand(-1, 1, h.shape[-1])).squeeze(1)
