"""Prompt prefixes a cache row still holds, so that a new request skips prefilling them.

A request's keys and values stay in its cache row after it ends, and the K/V at position q depend only on tokens
0..q: a later prompt that begins with the same tokens can start its prefill where they stop, as llama.cpp's server
and vLLM's prefix caching do. This is what makes a chat's next turn (the conversation so far plus a new message),
a regenerated reply or a shared system prompt cost only their new tokens. A row still in use lends its first
positions the same way (copied to the newcomer's row): n choices of one request, or requests arriving together
with the same beginning, compute it once (the scheduler holds them back while one prefills it). The reused K/V
were computed in other steps (other chunks, batches or decode steps) than a fresh prefill would use, so the logits
agree to rounding, not bit for bit.

Full-attention layers keep every position (slot = position). A sliding layer's ring of `ring` slots keeps only the
latest positions written: it still holds what a prompt resumed at L reads (positions L - window + 1 .. L - 1) only
if the row was written no further than L + ring - window since. So when a prompt's prefill ends, the ring slots its
resumption would read are saved (the window's K/V, per sliding layer), and restored when a later prompt resumes
there after the ring has moved on (a reply longer than the ring's slack, a regenerated reply).

Where prompts run as Python (eager, or inductor's compiled="decode"), a prompt may resume at any token; with
compiled prompt graphs, at a multiple of the interleave chunk (of the prefill chunk with mixed steps), where the
static shapes let a prompt's chunks begin. At least one prompt token is always left to compute the first token's
logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RowMemory:
    tokens: list[int] = field(default_factory=list)  # the K/V of tokens[q] is at position q
    written_end: int = 0  # one past the highest position written since `ring_from` was set
    ring_from: int = 0  # rings hold positions [max(ring_from, written_end - ring), written_end)
    saved_at: int = 0  # ring slots of the window before saved_at are saved (0: none)
    released: int = -1  # when its request ended, in release order (-1: never used)


def common_prefix(a, b, step: int = 256) -> int:
    """The number of leading tokens `a` and `b` share (compared a slice at a time: list equality runs in C)."""
    n, i = min(len(a), len(b)), 0
    while i < n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return min(i, n)


class PrefixReuse:
    """The memory of every cache row of a serving scheduler. `enabled=False` keeps none (every prompt from 0)."""

    def __init__(self, cache, shapes, enabled: bool = True, any_start: bool = False):
        self.cache, self.enabled = cache, enabled
        # where a resumed prompt's chunks may start: anywhere when prompts run as Python (`any_start`)
        self.align = 1 if any_start else shapes.prefill_chunk if shapes.mixed else shapes.interleave_chunk
        self.window = shapes.window
        self.ring = shapes.window_slots  # None: no layer keeps less than every position
        self.ring_layers = [] if self.ring is None else [l for l, k in enumerate(cache.keys) if k.shape[1] == self.ring]
        self.slots = cache.slots
        self.rows = [RowMemory() for _ in range(cache.max_batch_size)]
        self._saved: list[tuple[list[torch.Tensor], list[torch.Tensor]] | None] = [None] * cache.max_batch_size
        self._releases = 0

    # -- choosing a row ------------------------------------------------------------------------------------------
    def choose(self, free: list[int], prompt, busy: dict[int, list[int]] | None = None) -> tuple[int, int]:
        """(row, start): the free row that saves `prompt` the most prefill and where its prefill starts. With
        nothing to reuse, the lowest free row (the rows in use stay packed, the decode bucket small); what that row
        holds moves first to the free row that has held its memory longest, if any (a copy of its cache row). The
        row's rings are restored first where the start needs it. `busy`: the rows in use and the tokens whose K/V
        they hold; where one of them saves more, its first positions are copied to the lowest free row."""
        best, start, restore, source = free[0], 0, False, None
        if self.enabled:
            for i in free:
                at, saved = self._resume_at(self.rows[i], prompt)
                if at > start:
                    best, start, restore = i, at, saved
            for i, held in (busy or {}).items():
                memory = self.rows[i]
                at, _ = self._resume_at(RowMemory(held, memory.written_end, memory.ring_from), prompt)
                if at > start:
                    best, start, restore, source = free[0], at, False, i
            if start == 0 or source is not None:
                self._move_aside(best, [i for i in free if i != best])
        memory = self.rows[best]
        if source is not None:  # a copy of the running row's positions before `start` (and its rings)
            self.cache.copy_row(source, best, start)
            memory.written_end, memory.ring_from = self.rows[source].written_end, self.rows[source].ring_from
            memory.saved_at = 0
        elif restore:
            self._restore(best)
        elif start == 0:  # written from position 0 again: only the new request's positions count
            memory.written_end = memory.ring_from = 0
        memory.tokens = []  # in use: what it holds is told again when the request ends
        if memory.saved_at > start:
            memory.saved_at = 0
        return best, start

    def _move_aside(self, row: int, others: list[int]) -> None:
        memory = self.rows[row]
        if len(memory.tokens) < self.align or not others:
            return
        oldest = min(others, key=lambda i: (self.rows[i].released, i))
        if self.rows[oldest].released >= memory.released:
            return
        self.cache.copy_row(row, oldest, memory.written_end)
        self.rows[row], self.rows[oldest] = self.rows[oldest], memory
        self._saved[row], self._saved[oldest] = self._saved[oldest], self._saved[row]

    def _resume_at(self, memory: RowMemory, prompt) -> tuple[int, bool]:
        """Where `prompt` can start on a row with this memory, and whether the saved ring slots are needed."""
        usable = min(common_prefix(memory.tokens, prompt), len(prompt) - 1)
        at = usable // self.align * self.align
        if at == 0:
            return 0, False
        if self._ring_holds(memory, at):
            return at, False
        if 0 < memory.saved_at <= usable:
            return memory.saved_at, True
        return 0, False

    def _ring_holds(self, memory: RowMemory, at: int) -> bool:
        """Whether the rings still hold what a prompt resumed at `at` reads: positions at - window + 1 .. at - 1
        (a query sees the window - 1 positions before its own)."""
        if self.ring is None:
            return True
        return self._window_start(at) >= max(memory.ring_from, memory.written_end - self.ring)

    def _window_start(self, at: int) -> int:
        return max(0, at - self.window + 1)

    # -- what the scheduler tells -----------------------------------------------------------------------------
    def wrote(self, row: int, end: int) -> None:
        """Positions up to `end` (exclusive) of `row` were written."""
        memory = self.rows[row]
        memory.written_end = max(memory.written_end, end)

    def prompt_done(self, row: int, length: int) -> None:
        """Row `row` holds its prompt of `length` tokens and nothing past it yet: save the ring slots a later
        prompt resuming inside this one would read (where the rings hold them)."""
        memory = self.rows[row]
        at = (length - 1) // self.align * self.align
        memory.saved_at = 0
        if not self.enabled or not self.ring_layers or at == 0 or not self._ring_holds(memory, at):
            return
        if self._saved[row] is None:
            shape = lambda layer: (self.window,) + tuple(self.cache.keys[layer].shape[2:])  # noqa: E731
            like = self.cache.keys[self.ring_layers[0]]
            self._saved[row] = ([torch.empty(shape(l), dtype=like.dtype, device=like.device) for l in self.ring_layers],
                                [torch.empty(shape(l), dtype=like.dtype, device=like.device) for l in self.ring_layers])
        slots = self._ring_slots(at)
        for buffers, saved in zip((self.cache.keys, self.cache.values), self._saved[row]):
            for layer, dst in zip(self.ring_layers, saved):
                dst[:len(slots)].copy_(buffers[layer][row].index_select(0, slots))
        memory.saved_at = at

    def _restore(self, row: int) -> None:
        memory = self.rows[row]
        slots = self._ring_slots(memory.saved_at)
        for buffers, saved in zip((self.cache.keys, self.cache.values), self._saved[row]):
            for layer, src in zip(self.ring_layers, saved):
                buffers[layer][row].index_copy_(0, slots, src[:len(slots)])
        # the rings hold that window again; their other slots, of positions past it, count as unwritten
        memory.ring_from, memory.written_end = self._window_start(memory.saved_at), memory.saved_at

    def _ring_slots(self, at: int) -> torch.Tensor:
        return torch.arange(self._window_start(at), at, device=self.cache.keys[0].device) % self.ring

    def released(self, row: int, tokens: list[int]) -> None:
        """The request on `row` ended holding the K/V of `tokens` at positions 0.. (empty: nothing usable)."""
        memory = self.rows[row]
        memory.tokens = list(tokens) if self.enabled else []
        if memory.saved_at > len(memory.tokens):
            memory.saved_at = 0
        memory.released, self._releases = self._releases, self._releases + 1

    def idle_position(self, row: int) -> int:
        """Where a free row's dummy decode write goes: just past what it holds, never inside it."""
        memory = self.rows[row]
        if len(memory.tokens) >= self.slots:  # a full row: its last position goes
            del memory.tokens[self.slots - 1:]
            if memory.saved_at > len(memory.tokens):
                memory.saved_at = 0
        position = len(memory.tokens)
        self.wrote(row, position + 1)
        return position

    def forget_all(self) -> None:
        """Something else wrote the cache (`Runtime.generate` on the scheduler's runtime): no row holds anything."""
        for row in range(len(self.rows)):
            self.forget(row)

    def forget(self, row: int) -> None:
        """`row`'s first positions were overwritten (a dummy prefill chunk): it holds nothing usable."""
        self.rows[row].tokens = []
        self.rows[row].saved_at = 0
