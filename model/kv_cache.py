"""The static KV cache: per layer one key and one value buffer [max_batch, slots, kv_heads_per_rank, head_dim]
(BSND), allocated once and written in place. The runtime owns it and passes it to the model's entry points.

Every buffer is a ring: position p lives in slot p mod slots (model/ops). Full-attention layers get `slots`, at
least the longest context, so theirs never wraps; sliding-window layers may get `window_slots`, just enough for
the window plus the longest chunk a step writes, so that they keep only what they can still read.

A serving cache may keep one more row, the staging row, after the batch's: a prompt prefilled in chunks beside
running decode steps is written there (one graph runs both, graph/shapes.py's mixed steps), then copied to its
own row when it ends."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import GptOssConfig
from .host_memory import HugePageArena, nbytes
from .parallel import ShardPlan


@dataclass
class KVCache:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    has_staging: bool = False  # the last row is the staging row
    _views: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def max_batch_size(self) -> int:
        return self.keys[0].shape[0] - self.has_staging

    @property
    def staging_row(self) -> int:
        if not self.has_staging:
            raise RuntimeError("this KV cache has no staging row (allocated without staging=True)")
        return self.max_batch_size

    @property
    def slots(self) -> int:
        """The longest layer's slot count (the context the cache holds)."""
        return max(k.shape[1] for k in self.keys)

    def rows(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The first `n` rows of every layer's buffers (views: writes land in the cache). Made once per `n` and
        kept: every step asks for them, and slicing 2 x layers views costs microseconds each."""
        if n == self.keys[0].shape[0]:
            return self.keys, self.values
        if n not in self._views:
            self._views[n] = [k[:n] for k in self.keys], [v[:n] for v in self.values]
        return self._views[n]

    def staging(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The staging row of every layer's buffers, [1, S, Hkv, D] views."""
        row = self.staging_row
        if "staging" not in self._views:
            self._views["staging"] = [k[row:row + 1] for k in self.keys], [v[row:row + 1] for v in self.values]
        return self._views["staging"]

    def copy_row(self, src: int, dst: int, positions: int) -> None:
        """Row `dst` of every layer gets row `src`'s first `positions` positions (a ring's whole buffer once
        they fill it: position p is in slot p mod S)."""
        for buf in self.keys + self.values:
            n = min(positions, buf.shape[1])
            buf[dst, :n].copy_(buf[src, :n])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @staticmethod
    def layer_slots(config: GptOssConfig, slots: int, window_slots: int | None = None) -> list[int]:
        """Slots per layer: `slots`, or for sliding layers `window_slots` when given and smaller."""
        ring = slots if window_slots is None else min(window_slots, slots)
        return [ring if config.is_sliding(i) else slots for i in range(config.num_hidden_layers)]

    @classmethod
    def allocate(cls, config: GptOssConfig, plan: ShardPlan, max_batch_size: int, slots: int,
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 window_slots: int | None = None, staging: bool = False) -> "KVCache":
        shapes = [(max_batch_size + staging, n, plan.kv_heads, config.head_dim)
                  for n in cls.layer_slots(config, slots, window_slots)]
        if torch.device(device or torch.get_default_device()).type == "cpu":  # huge pages, as the weights
            # An anonymous mapping reads as zeros until written: not zeroed here, the rows and slots no sequence
            # reaches take no memory (most of a server's cache at a short context) and the load no time.
            arena = HugePageArena(2 * sum(nbytes(s, dtype) for s in shapes))
            return cls([arena.empty(s, dtype) for s in shapes], [arena.empty(s, dtype) for s in shapes], staging)
        return cls([torch.zeros(s, dtype=dtype, device=device) for s in shapes],
                   [torch.zeros(s, dtype=dtype, device=device) for s in shapes], staging)
