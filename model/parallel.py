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


@dataclass(frozen=True)
class Parallel:
    tp_size: int = 1
    rank: int = 0

    def __post_init__(self):
        if self.tp_size < 1 or not 0 <= self.rank < self.tp_size:
            raise ValueError(f"invalid tensor-parallel rank {self.rank} of {self.tp_size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


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
                f"tensor parallel size {tp} does not divide num_attention_heads={config.num_attention_heads}"
            )
        q_heads = config.num_attention_heads // tp
        kv_total = config.num_key_value_heads
        if kv_total >= tp:
            if kv_total % tp:
                raise ConfigError(f"tensor parallel size {tp} does not divide num_key_value_heads={kv_total}")
            kv_heads, kv_start = kv_total // tp, rank * (kv_total // tp)
        else:
            # Fewer kv heads than ranks: each rank keeps the one kv head its query heads read.
            if tp % kv_total:
                raise ConfigError(f"tensor parallel size {tp} is not a multiple of num_key_value_heads={kv_total}")
            kv_heads, kv_start = 1, rank // (tp // kv_total)
        if config.intermediate_size % tp:
            raise ConfigError(f"tensor parallel size {tp} does not divide intermediate_size={config.intermediate_size}")
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
