"""Prefill attention alone: the project's kernel (kernels.prefill_attention) against ATen's fused kernel
(torch_ops.attention_flash_cpu), on the same tensors at a checkpoint's heads, alternated in one process.

    python -m gptoss.tools.dev.bench_attention [--model checkpoints/bench] [--threads 2] [--rounds 5]
                                               [--shapes 256@256,256@7936,64@448] [--isa avx2]

A shape CHUNK@START is one batch row's chunk of CHUNK query tokens at positions START.. over a linear cache of
START + CHUNK slots (full attention), and the same chunk under the checkpoint's sliding window on a ring of
window + CHUNK slots. Inputs are random; the best of `--rounds` is kept for each kernel; the largest difference
between the two outputs is printed beside the times.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gptoss.model import kernels
from gptoss.model.ops import torch_ops
from gptoss.tools.dev.bench_kernels import best_time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="8@500,64@448,256@256,256@1792,256@7936")
    ap.add_argument("--isa", default="best", help="the kernels' instruction set (one of kernels.available_isas())")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels.set_isa(args.isa)
    config = json.loads((Path(args.model) / "config.json").read_text())
    q_heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    window, scale = config.get("sliding_window") or 0, dim ** -0.5
    print(f"{args.model}: {q_heads} q heads / {kv_heads} kv heads of {dim}; kernels {kernels.isa()}, "
          f"{args.threads} threads", flush=True)
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        chunk, start = (int(v) for v in shape.split("@"))
        for win in (0, window):
            slots = start + chunk if win == 0 else win + chunk
            q = torch.randn(1, chunk, q_heads, dim, generator=g)
            k, v = (torch.randn(1, slots, kv_heads, dim, generator=g) for _ in range(2))
            sinks = torch.randn(q_heads, generator=g)
            q_pos = start + torch.arange(chunk)[None]
            k_pos = torch_ops.slot_positions(q_pos, slots, slots)
            aten = lambda: torch_ops.attention_flash_cpu(q, k, v, sinks, q_pos, win, scale, k_pos)  # noqa: E731
            own = lambda: kernels.prefill_attention(q, k, v, sinks, k_pos, q_pos, win, scale)  # noqa: E731
            diff = (aten() - own()).abs().max().item()  # also the warm-up
            t_aten, t_own = best_time(aten, args.rounds), best_time(own, args.rounds)
            what = "full" if win == 0 else f"window {win}"
            print(f"{chunk:5d} rows @ {start:6d}, {slots:6d} slots, {what:10s}: ATen {t_aten * 1e3:8.2f} ms, "
                  f"own {t_own * 1e3:8.2f} ms ({t_own / t_aten:.2f}x), max |diff| {diff:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
