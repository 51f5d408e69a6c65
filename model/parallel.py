"""Tensor parallelism as data: the per-rank sizes of every sharded dimension, computed once.

Attention splits query heads (num_heads // tp per rank) and keeps max(kv_heads // tp, 1) kv heads per rank,
replicating kv heads when tp exceeds them. The MoE splits the expert intermediate dimension (columns of gate_up,
rows of down). Embedding and lm_head split the vocabulary. At tp 1 every collective is a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError, GptOssConfig


# `all_gather_single` is the current name of `all_gather_into_tensor` (deprecated in torch 2.13).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Parallel:
    """This process's place in the tensor-parallel group, and the collectives the model calls.

    The group is the default process group (one process per rank, set up by runtime.distributed under torchrun),
    whose world size must equal `tp_size`. The collectives are the plain `torch.distributed` ones: eager runs them
    directly, and dynamo rewrites them into functional collectives (`_c10d_functional.*`) inside a
    `torch.compile(fullgraph=True)` graph, so the same model code is captured with its collectives in-graph."""

    tp_size: int = 1
    rank: int = 0

    def __post_init__(self):
        if self.tp_size < 1 or not 0 <= self.rank < self.tp_size:
            raise ValueError(f"invalid tensor-parallel rank {self.rank} of {self.tp_size}")

    def check_group(self) -> None:
        """Raise unless the default process group matches this rank (tp > 1 only)."""
        if self.tp_size == 1:
            return
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"tensor parallel size {self.tp_size} needs a torch.distributed process group: "
                               f"launch with `torchrun --nproc-per-node {self.tp_size} ...`")
        if dist.get_world_size() != self.tp_size or dist.get_rank() != self.rank:
            raise RuntimeError(f"model built for rank {self.rank} of {self.tp_size}, but this process is rank "
                               f"{dist.get_rank()} of a process group of {dist.get_world_size()}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (returns `x`)."""
        if self.tp_size == 1:
            return x
        dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., tp * n], rank r's part at columns r*n .. (r+1)*n. One gather into a
        single buffer (rank-major), then a transpose."""
        if self.tp_size == 1:
            return x
        lead, n = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, n).contiguous()
        out = torch.empty((self.tp_size * flat.shape[0], n), dtype=x.dtype, device=x.device)
        _all_gather_single(out, flat)
        return out.view(self.tp_size, -1, n).permute(1, 0, 2).reshape(*lead, self.tp_size * n)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x` on every rank, in place (returns `x`). Used outside the graphs (sampled tokens)."""
        if self.tp_size == 1:
            return x
        dist.broadcast(x, src)
        return x


@dataclass(frozen=True)
class ShardPlan:
    """Per-rank sizes and the global ranges this rank owns."""

    q_heads: int
    kv_heads: int
    kv_head_start: int  # first global kv head held by this rank
    q_head_start: int
    intermediate: int
    intermediate_start: int
    vocab: int
    vocab_start: int

    @classmethod
    def build(cls, config: GptOssConfig, parallel: Parallel) -> "ShardPlan":
        tp, rank = parallel.tp_size, parallel.rank
        if config.num_attention_heads % tp:
            raise ConfigError(
                f"tensor parallel size {tp} does not divide num_attention_heads={config.num_attention_heads}: "
                f"query heads are split evenly over the ranks (sizes this model supports: "
                f"{supported_tp_sizes(config)})")
        q_heads = config.num_attention_heads // tp
        kv_total = config.num_key_value_heads
        if kv_total >= tp:
            if kv_total % tp:
                raise ConfigError(f"tensor parallel size {tp} does not divide num_key_value_heads={kv_total} "
                                  f"(sizes this model supports: {supported_tp_sizes(config)})")
            kv_heads, kv_start = kv_total // tp, rank * (kv_total // tp)
        else:
            # Fewer kv heads than ranks: each rank keeps the one kv head its query heads read.
            if tp % kv_total:
                raise ConfigError(f"tensor parallel size {tp} is not a multiple of num_key_value_heads={kv_total} "
                                  f"(sizes this model supports: {supported_tp_sizes(config)})")
            kv_heads, kv_start = 1, rank // (tp // kv_total)
        if config.intermediate_size % tp:
            raise ConfigError(f"tensor parallel size {tp} does not divide intermediate_size={config.intermediate_size} "
                              f"(sizes this model supports: {supported_tp_sizes(config)})")
        inter = config.intermediate_size // tp
        vocab = -(-config.vocab_size // tp)  # ceil: the last rank may hold padding rows
        return cls(
            q_heads=q_heads,
            kv_heads=kv_heads,
            kv_head_start=kv_start,
            q_head_start=rank * q_heads,
            intermediate=inter,
            intermediate_start=rank * inter,
            vocab=vocab,
            vocab_start=rank * vocab,
        )


def supported_tp_sizes(config: GptOssConfig, limit: int = 64) -> list[int]:
    """Tensor-parallel sizes up to `limit` that split this model evenly: they divide the query heads and the
    expert width, and either divide the kv heads or are a multiple of them (kv heads replicated)."""
    kv = config.num_key_value_heads
    return [t for t in range(1, limit + 1)
            if config.num_attention_heads % t == 0 and config.intermediate_size % t == 0
            and (kv % t == 0 or t % kv == 0)]
