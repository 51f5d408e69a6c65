"""The CPU kernels alone, at a checkpoint's shapes: weight bytes streamed per second vs a plain copy, same process.

    python -m gptoss.tools.dev.bench_kernels [--model checkpoints/bench] [--threads 2] [--rounds 5]

Decode shapes (rows per expert 1, top-k experts, as a batch-1 step): the MXFP4 expert matmuls (gate_up, down) and
the bf16 gemv (q projection, lm_head); the weights cycle through enough copies (`--footprint-mb`) that they come
from memory, not cache, like a real step's. GB/s counts the bytes of the published weights read. Prefill shapes
(512 tokens, top-k rows each, spread over the experts as routing does): published kernels vs the dense fp32 path
(the same matmuls on dequantised weights), as a time ratio. Rounds alternate; the best of each is kept; the copy
bandwidth is measured between rounds. The CPU's instruction set and load averages are printed with the figures.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from gptoss.model import kernels
from gptoss.model.config import GptOssConfig
from gptoss.model.mxfp4 import dequantize_mxfp4
from gptoss.model.ops.grouped_mm import grouped_mm
from gptoss.tools.dev.bench import copy_bandwidth, fma_summary


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def mxfp4_weights(copies: int, experts: int, m: int, k: int):
    g = torch.Generator().manual_seed(m * k)
    return [(torch.randint(0, 256, (experts, m, k // 32, 16), dtype=torch.uint8, generator=g),
             torch.randint(118, 124, (experts, m, k // 32), dtype=torch.uint8, generator=g)) for _ in range(copies)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--footprint-mb", type=int, default=256, help="weights cycled through on the decode shapes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    c = GptOssConfig.from_pretrained(args.model)
    hidden, inter, experts, top_k = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok
    q_out = c.num_attention_heads * c.head_dim

    # -- decode: one row per selected expert, weights out of cache --------------------------------------------
    layer_bytes = experts * (2 * inter * hidden + hidden * inter) * 17 // 32
    copies = max(2, args.footprint_mb * 2**20 // layer_bytes)
    gate_up = mxfp4_weights(copies, experts, 2 * inter, hidden)
    down = mxfp4_weights(copies, experts, hidden, inter)
    lm_heads = [torch.randn(c.vocab_size, hidden).bfloat16() for _ in range(max(2, args.footprint_mb * 2**20
                                                                                // (c.vocab_size * hidden * 2)))]
    q_projs = [torch.randn(q_out, hidden).bfloat16() for _ in range(copies)]
    gen = torch.Generator().manual_seed(0)
    choice = [torch.randperm(experts, generator=gen)[:top_k].sort().values for _ in range(64)]
    offs = [torch.bincount(sel, minlength=experts).cumsum(0).to(torch.int32) for sel in choice]
    x_h, x_i, gu_bias, d_bias = torch.randn(top_k, hidden), torch.randn(top_k, inter), None, None
    state = {"i": 0}

    def step_experts():
        i = state["i"] = state["i"] + 1
        b, s = gate_up[i % copies]
        kernels.mxfp4_grouped_mm(x_h, b, s, offs[i % 64], gu_bias)
        b, s = down[i % copies]
        kernels.mxfp4_grouped_mm(x_i, b, s, offs[i % 64], d_bias)

    def step_q():
        i = state["i"] = state["i"] + 1
        kernels.bf16_linear(x_h[:1], q_projs[i % copies])

    def step_lm_head():
        i = state["i"] = state["i"] + 1
        kernels.bf16_linear(x_h[:1], lm_heads[i % len(lm_heads)])

    expert_bytes = top_k * (2 * inter * hidden + hidden * inter) * 17 // 32
    decode = {"experts (gate_up+down, top-k rows 1)": (step_experts, expert_bytes, 20),
              "q projection (bf16 gemv)": (step_q, q_out * hidden * 2, 40),
              "lm_head (bf16 gemv)": (step_lm_head, c.vocab_size * hidden * 2, 10)}

    # -- prefill: 512 tokens x top-k rows spread over the experts ----------------------------------------------
    tokens = 512
    sel = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).reshape(-1)
    pf_offs = torch.bincount(sel, minlength=experts).cumsum(0).to(torch.int32)
    pf_x, pf_xi = torch.randn(tokens * top_k, hidden), torch.randn(tokens * top_k, inter)
    gb, gs = gate_up[0]
    db, ds = down[0]
    gu_dense = dequantize_mxfp4(gb, gs).transpose(1, 2).contiguous()  # [E, in, out], as the dense model holds it
    d_dense = dequantize_mxfp4(db, ds).transpose(1, 2).contiguous()
    attn_x, q_bf16 = torch.randn(tokens, hidden), q_projs[0]
    q_dense = q_bf16.float()
    prefill = {
        "experts (gate_up+down, 2048 rows)": (
            lambda: (kernels.mxfp4_grouped_mm(pf_x, gb, gs, pf_offs), kernels.mxfp4_grouped_mm(pf_xi, db, ds, pf_offs)),
            lambda: (grouped_mm(pf_x, gu_dense, pf_offs), grouped_mm(pf_xi, d_dense, pf_offs))),
        "q projection (512 rows)": (lambda: kernels.bf16_linear(attn_x, q_bf16), lambda: F.linear(attn_x, q_dense)),
    }

    best: dict = {}
    bandwidth = 0.0
    for _ in range(args.rounds):
        bandwidth = max(bandwidth, copy_bandwidth(256, 3))
        for name, (fn, _, reps) in decode.items():
            fn()
            best[name] = min(best.get(name, float("inf")), best_time(fn, reps))
        for name, (pub, dense) in prefill.items():
            for tag, fn in (("published", pub), ("dense", dense)):
                fn()
                key = (name, tag)
                best[key] = min(best.get(key, float("inf")), best_time(fn, 2))

    print(f"CPU kernels: {kernels.isa()} (this CPU runs {kernels.available_isas()}), prefetch {kernels.prefetch()}; "
          f"{args.threads} threads; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {fma_summary(kernels.fma_rates())}; "
          f"load averages {os.getloadavg()}")
    print("decode shapes (weights from memory):")
    for name, (_, nbytes, _) in decode.items():
        t = best[name]
        print(f"  {name:<40} {t * 1e6:8.1f} us  {nbytes / t / 1e9:6.1f} GB/s  = {nbytes / t / bandwidth:6.1%} of copy")
    print("prefill shapes (published / dense fp32 time; < 1 is faster):")
    for name in prefill:
        tp, td = best[(name, "published")], best[(name, "dense")]
        print(f"  {name:<40} published {tp * 1e3:7.2f} ms  dense {td * 1e3:7.2f} ms  ratio {tp / td:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
