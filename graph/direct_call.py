"""Calling inductor's compiled callable without the layers torch.compile puts around it.

A compiled entry point is reached through dynamo's code (which fetches every parameter from the model's
attributes: 74 for the bench checkpoint), AOTAutograd's runtime wrapper and inductor's `CompiledFxGraph`, before
the generated code runs. On their own those layers cost ~18 us a call, but a decode step runs them with caches
the step's weight stream has just evicted: ~0.28 ms of a ~4 ms batch-1 step of the bench checkpoint, measured
(BENCHMARKS.md, session 41). A direct call keeps the flat input list the layers build and hands it to the
generated code, refilling only the slots of the step's own inputs.

Only when one call through the layers shows they do nothing else: exactly one compiled graph runs; each of its
inputs is one of the call's tensors or a tensor the model holds (a parameter, a buffer, a tensor attribute); and it
returns exactly the call's result (no mutation epilogue, no output rebuilt as a view, no extra inputs such as RNG
seeds or effect tokens). Anything else keeps the wrapped call.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

_capturing = threading.Lock()  # one capture at a time: each swaps a class attribute in and out


def _leaves(inputs: Sequence) -> list:
    """The call's tensors in order: a list argument (a cache's per-layer buffers) contributes its elements."""
    out = []
    for x in inputs:
        if isinstance(x, (list, tuple)):
            out.extend(x)
        else:
            out.append(x)
    return out


def model_tensors(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Every tensor the model holds, by identity: parameters, buffers and plain tensor attributes."""
    held = {id(t): t for t in model.parameters()}
    held.update({id(t): t for t in model.buffers()})
    for module in model.modules():
        held.update({id(v): v for v in vars(module).values() if isinstance(v, torch.Tensor)})
    return held


@dataclass
class DirectCall:
    """The generated code's callable and its flat inputs: constants in place, `slots` (position in the flat list,
    index in the call's tensors) refilled each call."""
    inner: Callable
    template: list
    slots: list[tuple[int, int]]

    def __call__(self, inputs: Sequence) -> torch.Tensor:
        leaves, args = _leaves(inputs), self.template.copy()  # the generated code empties the list it is given
        for at, leaf in self.slots:
            args[at] = leaves[leaf]
        return self.inner(args)[0]


def plan(inner: Callable, graph_inputs: Sequence, graph_result, result, inputs: Sequence,
         held: dict[int, torch.Tensor]) -> DirectCall | None:
    """A DirectCall of `inner` reproducing one recorded call (the graph's inputs and result, the call's inputs and
    result), or None when the layers around the graph did more than forward them."""
    if not isinstance(result, torch.Tensor) or not isinstance(graph_result, (list, tuple)) \
            or len(graph_result) != 1 or graph_result[0] is not result:
        return None
    position = {id(t): i for i, t in enumerate(_leaves(inputs)) if isinstance(t, torch.Tensor)}
    template, slots = [], []
    for at, x in enumerate(graph_inputs):
        if id(x) in position:
            slots.append((at, position[id(x)]))
            template.append(None)
        elif id(x) in held:
            template.append(x)
        else:
            return None
    return DirectCall(inner, template, slots)


def capture(call: Callable[[], torch.Tensor], inputs: Sequence, model: torch.nn.Module):
    """Run `call` (a compiled entry point on `inputs`) once through the layers, recording the compiled graphs it
    reaches on this thread. Returns (its result, a DirectCall or None)."""
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except ImportError:
        return call(), None
    seen, me = [], threading.get_ident()
    with _capturing:
        through = CompiledFxGraph.__call__

        def spy(graph, graph_inputs):
            if threading.get_ident() != me:  # another thread's graph
                return through(graph, graph_inputs)
            seen.append([graph, list(graph_inputs)])
            out = through(graph, graph_inputs)
            seen[-1].append(out)
            return out

        CompiledFxGraph.__call__ = spy
        try:
            result = call()
        finally:
            CompiledFxGraph.__call__ = through
    if len(seen) != 1 or len(seen[0]) != 3 or getattr(seen[0][0], "current_callable", None) is None:
        return result, None
    graph, graph_inputs, graph_result = seen[0]
    return result, plan(graph.current_callable, graph_inputs, graph_result, result, inputs, model_tensors(model))
