"""The static KV cache: per layer one key and one value buffer [max_batch, slots, kv_heads_per_rank, head_dim]
(BSND), allocated once and written in place. The runtime owns it and passes it to the model's entry points."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GptOssConfig
from .parallel import ShardPlan


@dataclass
class KVCache:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def max_batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def slots(self) -> int:
        return self.keys[0].shape[1]

    def rows(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The first `n` rows of every layer's buffers (views: writes land in the cache)."""
        if n == self.max_batch_size:
            return self.keys, self.values
        return [k[:n] for k in self.keys], [v[:n] for v in self.values]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @classmethod
    def allocate(cls, config: GptOssConfig, plan: ShardPlan, max_batch_size: int, slots: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> "KVCache":
        shape = (max_batch_size, slots, plan.kv_heads, config.head_dim)
        make = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return cls([make() for _ in range(config.num_hidden_layers)],
                   [make() for _ in range(config.num_hidden_layers)])
