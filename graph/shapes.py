"""The static shapes the runtime runs at: a bounded set, known up front, so that every graph can be built ahead
of time and steady-state serving never meets a new shape.

- cache slots: max_seq_len rounded up to a whole prefill chunk (a chunk's padding tokens then always land
  inside the buffer) and to `slot_multiple` (the NPU attention reads the cache as 128-slot pages);
- prefill chunk length: a prompt that fits in one chunk runs at the smallest power of two from `min_chunk` to
  `prefill_chunk` that covers it; a longer one runs as full `prefill_chunk`s; while other requests decode, the
  serving scheduler prefills at most `interleave_chunk` tokens per step (batch-1 graphs of that length at every
  kv_len), so that one step of the running streams never waits for a whole `prefill_chunk`. A batch-1 prompt's
  last chunk is cut the same way as a first one (the smallest power of two that covers the rest), so a 300-token
  prompt costs a 256- and a 64-token chunk, not two of 256: every chunk still starts at a multiple of its length
  and ends inside the cache's slots. With a `granule` (a power of two), such first and last chunks round up to a
  multiple of it instead (300 tokens: 256 + 48 with granule 16): less padding computed, more chunk lengths (the
  eager backend, which builds no graphs, takes granule 1 and min_chunk 1: no padding; see runtime.settings). A
  chunk that starts at a multiple of the step it runs in and is no longer than that step still ends inside the
  cache and never wraps a ring;
- attention reads `kv_len` cache slots: a power of two from `min_kv` up to the slot count, the smallest that
  covers the furthest position in the step, so decode work follows the actual context, not max_seq_len. Where
  attention costs only what the slots a query sees cost (the CPU kernels skip the rest), `kv_buckets=False`: every
  step reads the whole cache, one kv_len, so one graph per batch and chunk instead of one per kv_len as well;
- sliding-window layers (window_cache="ring"): a ring of `window_slots`, the window plus the longest chunk a step
  writes (window + chunk - 1 slots: the first query of a chunk still sees its whole window after the chunk's last
  write). With paged attention (`slot_multiple` > 1) a row's window then starts in the first page its block table
  lists, so one more page less two slots, and the ring is a whole number of pages and of prefill chunks (a chunk,
  which starts at a multiple of the chunk, never wraps: one contiguous write). window_cache="full": every layer
  keeps max_seq_len slots;
- batch: the smallest of `batch_sizes` (default: powers of two up to max_batch_size) that holds the prompts;
  extra rows are idle padding;
- mixed steps (`mixed`, for serving): a prompt's `interleave_chunk`-token chunk and the running rows' decode step
  run as one graph (decode batch x the chunk's kv_len: the decode rows read their whole cache), the chunk on a
  staging row the cache keeps beside the batch's rows; these graphs replace the batch-1 interleave prefills.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


WINDOW_CACHES = ("ring", "full")


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class ShapePlan:
    max_batch_size: int
    max_seq_len: int
    prefill_chunk: int = 256
    min_chunk: int = 16
    min_kv: int = 128
    batch_buckets: tuple[int, ...] | None = None
    slot_multiple: int = 1
    interleave_chunk: int | None = None  # None: prefill_chunk (no graphs of their own)
    window: int = 0  # the sliding layers' window (0: no sliding layers)
    window_cache: str = "ring"  # "ring": sliding layers keep only their window; "full": max_seq_len slots
    mixed: bool = False  # serving: chunk + decode steps as one graph (see the module docstring)
    granule: int = 0  # first/last chunks round up to a multiple of this; 0: to a power of two
    kv_buckets: bool = True  # kv_len follows the context in powers of two; False: always the slot count

    def __post_init__(self):
        if self.window_cache not in WINDOW_CACHES:
            raise ValueError(f"window_cache must be one of {', '.join(WINDOW_CACHES)}, got {self.window_cache!r}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        for name in ("max_batch_size", "max_seq_len", "prefill_chunk", "min_chunk", "min_kv"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prefill_chunk", "min_chunk"):
            if _next_pow2(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"{name} must be a power of two, got {getattr(self, name)}")
        if self.granule and (self.granule < 1 or _next_pow2(self.granule) != self.granule
                             or self.granule > self.prefill_chunk):
            raise ValueError(f"granule must be 0 (powers of two) or a power of two up to prefill_chunk="
                             f"{self.prefill_chunk}, got {self.granule}")
        if self.interleave_chunk is None:
            object.__setattr__(self, "interleave_chunk", self.prefill_chunk)
        if not 1 <= self.interleave_chunk <= self.prefill_chunk or \
                _next_pow2(self.interleave_chunk) != self.interleave_chunk:
            raise ValueError(f"interleave_chunk must be a power of two from 1 to prefill_chunk={self.prefill_chunk}, "
                             f"got {self.interleave_chunk}")

        if self.batch_buckets is not None:
            if not self.batch_buckets or min(self.batch_buckets) < 1 or max(self.batch_buckets) > self.max_batch_size:
                raise ValueError(f"batch sizes {self.batch_buckets} must lie in 1..max_batch_size="
                                 f"{self.max_batch_size}")

    @property
    def slots(self) -> int:
        unit = math.lcm(self.prefill_chunk, self.slot_multiple)
        return -(-self.max_seq_len // unit) * unit

    @property
    def window_slots(self) -> int | None:
        """The sliding layers' ring size, or None when they keep `slots` (no window, "full", or no smaller)."""
        if self.window == 0 or self.window_cache == "full":
            return None
        need = self.window + self.prefill_chunk - 1
        if self.slot_multiple > 1:
            unit = math.lcm(self.prefill_chunk, self.slot_multiple)
            need = -(-(need + self.slot_multiple - 1) // unit) * unit
        return need if need < self.slots else None

    def batch(self, n: int) -> int:
        return min(b for b in self.batch_sizes() if b >= n)

    def chunk(self, start: int, remaining: int, *, interleaved: bool = False, batch: int = 1) -> int:
        """The length of the prefill chunk that starts at `start` with `remaining` prompt tokens left, for a
        graph of `batch` rows. `interleaved` (batch 1, while other rows decode): at most `interleave_chunk`. A
        prompt begun in small chunks continues in them until its start is a whole number of full chunks again,
        so that every chunk ends inside the cache's slots. A first chunk, and a batch-1 prompt's last one, is
        the smallest power of two (`min_chunk` at least) that covers the rest of the prompt, or with a `granule`
        the smallest multiple of it. A start off that grid (a prompt resumed after reused tokens, where prompts run
        as Python) first runs up to the next multiple of the step."""
        step = self.interleave_chunk if interleaved or start % self.prefill_chunk else self.prefill_chunk
        if start and batch > 1:
            return step
        cover = -(-remaining // self.granule) * self.granule if self.granule else _next_pow2(remaining)
        return min(max(cover, self.min_chunk), step - start % step)

    def kv_len(self, needed: int) -> int:
        if not self.kv_buckets:
            return self.slots
        return min(max(_next_pow2(needed), self.min_kv), self.slots)

    # -- the whole set, for building graphs ahead of time ------------------------------------------------
    def batch_sizes(self) -> list[int]:
        if self.batch_buckets is not None:
            return sorted(set(self.batch_buckets) | {self.max_batch_size})
        return sorted({min(_next_pow2(n), self.max_batch_size) for n in range(1, self.max_batch_size + 1)})

    def chunk_sizes(self) -> list[int]:
        return sorted({self.chunk(0, n) for n in range(1, self.prefill_chunk + 1)})

    def kv_lens(self) -> list[int]:
        out, n = set(), 1
        while True:
            out.add(self.kv_len(n))
            if n >= self.slots:
                return sorted(out)
            n *= 2

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """(chunk, kv_len) pairs a prefill can meet: a first chunk of any size, later full chunks anywhere."""
        pairs = {(c, self.kv_len(c)) for c in self.chunk_sizes()}
        pairs |= {(self.prefill_chunk, self.kv_len(s + self.prefill_chunk))
                  for s in range(self.prefill_chunk, self.slots, self.prefill_chunk)}
        return sorted(pairs)

    def tail_shapes(self) -> list[tuple[int, int]]:
        """(chunk, kv_len) pairs of a batch-1 prompt's last chunk: any chunk size no longer than the step at any
        start a batch-1 chunk can have (a multiple of `interleave_chunk`). With mixed steps a whole interleave
        chunk inside a full chunk runs in a mixed graph (its prompt is on the staging row), only shorter ones
        apart."""
        pairs = set()
        for s in range(0, self.slots, self.interleave_chunk):
            step = self.prefill_chunk if s % self.prefill_chunk == 0 else self.interleave_chunk
            mixed_only = self.interleave_chunk if self.mixed and s % self.prefill_chunk else None
            pairs |= {(c, self.kv_len(s + c)) for c in self.chunk_sizes() if c <= step and c != mixed_only}
        return sorted(pairs)

    def interleave_shapes(self) -> list[tuple[int, int]]:
        """(chunk, kv_len) pairs of the batch-1 prefills that run while other rows decode."""
        step = self.interleave_chunk
        return sorted({(step, self.kv_len(s + step)) for s in range(0, self.slots, step)})

    def mixed_kv_lens(self) -> list[int]:
        """The kv_lens a mixed step can meet: its chunk ends at interleave_chunk or later."""
        return [kv for kv in self.kv_lens() if kv >= self.kv_len(self.interleave_chunk)]

    # -- as recorded in an artifact manifest (the settings a graph set was built for) ------------------------
    def to_record(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "max_seq_len": self.max_seq_len,
                "prefill_chunk": self.prefill_chunk, "min_chunk": self.min_chunk, "min_kv": self.min_kv,
                "batch_sizes": self.batch_sizes(), "slot_multiple": self.slot_multiple,
                "interleave_chunk": self.interleave_chunk, "window": self.window,
                "window_cache": self.window_cache, "window_slots": self.window_slots, "mixed": self.mixed,
                **({"granule": self.granule} if self.granule else {}),  # absent: what graph sets built before had
                **({} if self.kv_buckets else {"kv_buckets": False})}

    @classmethod
    def from_record(cls, record: dict) -> "ShapePlan":
        return cls(record["max_batch_size"], record["max_seq_len"], record["prefill_chunk"],
                   min_chunk=record.get("min_chunk", 16), min_kv=record.get("min_kv", 128),
                   batch_buckets=tuple(record["batch_sizes"]), slot_multiple=record.get("slot_multiple", 1),
                   interleave_chunk=record.get("interleave_chunk"), window=record.get("window", 0),
                   window_cache=record.get("window_cache", "full"), mixed=record.get("mixed", False),
                   granule=record.get("granule", 0), kv_buckets=record.get("kv_buckets", True))

    def specs(self) -> list["GraphSpec"]:
        """Every graph a runtime with this plan can call."""
        specs = []
        for b in self.batch_sizes():
            shapes = set(self.prefill_shapes())
            if b == 1:
                shapes |= set(self.tail_shapes())
                if not self.mixed:
                    shapes |= set(self.interleave_shapes())
            specs += [GraphSpec("prefill", b, c, kv) for c, kv in sorted(shapes)]
            specs += [GraphSpec("decode", b, 1, kv) for kv in self.kv_lens()]
            if self.mixed:
                specs += [GraphSpec("mixed", b, self.interleave_chunk, kv) for kv in self.mixed_kv_lens()]
        return specs


@dataclass(frozen=True)
class GraphSpec:
    """One static shape of one entry point."""

    kind: str  # "prefill", "decode" or "mixed"
    batch: int  # rows (mixed: decode rows, beside one chunk row)
    steps: int  # tokens per row: the prefill chunk, 1 for decode (mixed: the chunk's)
    kv_len: int

    @property
    def name(self) -> str:
        return f"{self.kind}_b{self.batch}_t{self.steps}_kv{self.kv_len}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "batch": self.batch, "steps": self.steps, "kv_len": self.kv_len}
