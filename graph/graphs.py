"""A set of graphs: one callable per static shape of each entry point, and the calling convention they share.

Every backend's builder returns `Graphs` whose callables take the entry point's tensor inputs only:

    prefill graph: (ids [B, T], start [B], last [B], keys, values) -> logits [B, vocab]
    decode graph:  (ids [B], pos [B], keys, values)                  -> logits [B, vocab]
    mixed graph:   (ids [B], pos [B], keys, values, chunk_ids [1, T], start [1], last [1], chunk_keys, chunk_values)
                                                                     -> logits [B + 1, vocab]
      (a decode step of B rows and one prompt's chunk on the cache's staging row, in one pass over the weights)

The model and the static `kv_len` are bound when the graph is built (a GraphSpec names both shapes).
"""
from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .direct_call import DirectCall, capture
from .entry import decode_entry, mixed_entry, prefill_entry
from .shapes import GraphSpec, ShapePlan

ENTRIES = {"prefill": prefill_entry, "decode": decode_entry, "mixed": mixed_entry}


class Graphs:
    """`prefill`/`decode` pick the graph built for the inputs' shape and the requested kv_len.

    Entry points that run as Python for every shape of the set (all of them on eager; prompts with inductor's
    compiled="decode") also run at shapes the set does not list, given the `model`: a prompt resumed after
    tokens a cache row still held (runtime/prefix_reuse.py) starts its chunks off the static grid."""

    def __init__(self, backend: str, fns: dict[GraphSpec, Callable], eager: frozenset = frozenset(), model=None):
        self.backend, self.fns = backend, fns
        self.eager = eager  # the specs that run the entry points as Python (all on eager; compiled="decode")
        compiled_kinds = {s.kind for s in fns if s not in eager}
        self.python_kinds = frozenset() if model is None else frozenset({s.kind for s in eager} - compiled_kinds)
        self._model = model
        self._unlisted: dict[GraphSpec, Callable] = {}
        self.compile_seconds = 0.0
        self.loaded_from: Path | None = None  # the artifact directory the graphs were loaded from, if any
        self.calls = 0  # graph calls so far: each writes the cache it is given

    def __len__(self) -> int:
        """The shapes this set runs, compiled or not (see `compiled`)."""
        return len(self.fns)

    @property
    def compiled(self) -> int:
        """How many of them are compiled graphs."""
        return len(self.fns) - len(self.eager)

    def _fn(self, spec: GraphSpec) -> Callable:
        fn = self.fns.get(spec) or self._unlisted.get(spec)
        if fn is None and spec.kind in self.python_kinds:
            fn = self._unlisted[spec] = bind(ENTRIES[spec.kind], self._model, spec.kv_len)
        if fn is None:
            raise KeyError(f"no {self.backend} graph for {spec.name}: the shape set was built for "
                           f"{sorted(s.name for s in self.fns)[:6]}...")
        return fn

    def prefill(self, ids, start, last, keys, values, kv_len: int):
        self.calls += 1
        return self._fn(GraphSpec("prefill", ids.shape[0], ids.shape[1], kv_len))(ids, start, last, keys, values)

    def prefill_scored(self, ids, start, keys, values, kv_len: int):
        """A prefill chunk with logits at every token, [B, T, vocab] (a prompt's log-probabilities): the model's
        Python on every backend, at any shape (few requests ask; graphs for it would double the set)."""
        if self._model is None:
            raise RuntimeError(f"the {self.backend} graphs were built without the model: no scored prefill")
        self.calls += 1
        return self._model.prefill_scored(ids, start, keys, values, kv_len)

    def decode(self, ids, pos, keys, values, kv_len: int):
        self.calls += 1
        return self._fn(GraphSpec("decode", ids.shape[0], 1, kv_len))(ids, pos, keys, values)

    def mixed(self, ids, pos, keys, values, chunk_ids, start, last, chunk_keys, chunk_values, kv_len: int):
        self.calls += 1
        return self._fn(GraphSpec("mixed", ids.shape[0], chunk_ids.shape[1], kv_len))(
            ids, pos, keys, values, chunk_ids, start, last, chunk_keys, chunk_values)


def bind(entry_fn: Callable, model, kv_len: int) -> Callable:
    """An entry point (or its compiled form, same signature) as a graph callable of the shared convention."""
    return partial(entry_fn, model, kv_len=kv_len) if entry_fn in ENTRIES.values() else _Bound(entry_fn, model, kv_len)


class _Bound:
    """A compiled entry point with the model and kv_len bound (compiled functions take them positionally).

    Dynamo checks a compiled function's guards (every input's and parameter's shape, stride and dtype) on each
    call: ~0.1 ms, a few percent of a decode step. The first call checks them (the graph fits this model and
    the runtime's buffers); later calls skip them: the runtime calls each graph only with the static buffers and
    shapes it was compiled for. Where that first call shows the layers around inductor's generated code only
    forward inputs and outputs, later calls skip the layers too (graph/direct_call.py)."""

    def __init__(self, fn: Callable, model, kv_len: int):
        self.fn, self.model, self.kv_len = fn, model, kv_len
        self._checked = not hasattr(fn, "disable_guard_check")
        self.direct: DirectCall | None = None

    def __call__(self, *inputs):
        if self.direct is not None:
            return self.direct(inputs)
        if self._checked:
            return self.fn(self.model, *inputs, self.kv_len)
        out, self.direct = capture(lambda: self.fn(self.model, *inputs, self.kv_len), inputs, self.model)
        self.fn.disable_guard_check()
        self._checked = True
        return out


def example_inputs(spec: GraphSpec, model, cache) -> tuple:
    """Inputs of the spec's shape, on the model's device, over the runtime's own cache rows."""
    dev = model.device
    keys, values = cache.rows(spec.batch)
    row = lambda: torch.zeros(spec.batch, dtype=torch.long, device=dev)  # noqa: E731 (distinct: no aliasing guard)
    if spec.kind == "prefill":
        return torch.zeros(spec.batch, spec.steps, dtype=torch.long, device=dev), row(), row(), keys, values
    if spec.kind == "mixed":
        one = lambda: torch.zeros(1, dtype=torch.long, device=dev)  # noqa: E731
        return (row(), row(), keys, values, torch.zeros(1, spec.steps, dtype=torch.long, device=dev), one(), one(),
                *cache.staging())
    return row(), row(), keys, values


def build_eager(model, shapes: ShapePlan, cache, settings) -> Graphs:
    """No capture: each shape runs the entry point as Python (the reference, and for debugging)."""
    fns = {s: bind(ENTRIES[s.kind], model, s.kv_len) for s in shapes.specs()}
    return Graphs("eager", fns, frozenset(fns), model)


class Progress:
    """A one-line progress bar on stderr while graphs compile (only on a terminal, or with GPTOSS_PROGRESS)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.started = total, time.perf_counter()
        self.enabled = enabled and (sys.stderr.isatty() or bool(os.environ.get("GPTOSS_PROGRESS")))

    def __call__(self, i: int, name: str) -> None:
        if not self.enabled:
            return
        done = int(30 * i / self.total)
        sys.stderr.write(f"\rcompiling graphs [{'#' * done}{'.' * (30 - done)}] {i}/{self.total} {name:<28} "
                         f"{time.perf_counter() - self.started:6.1f}s" + ("\n" if i == self.total else ""))
        sys.stderr.flush()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
