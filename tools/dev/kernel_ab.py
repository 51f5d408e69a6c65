"""The CPU kernels of a git revision against the working tree's, built side by side, alternated in one process.

    python -m gptoss.tools.dev.kernel_ab --base HEAD~1 [--op moe|linear] [--shape 20b|bench] [--rows 1]
                                         [--threads 2] [--rounds 7]

Both sides are compiled the same way as modules of their own (the working tree's too, not the loaded extension),
and the order alternates each round. Even so, two builds of the same source have measured up to ~20% apart on
one machine (code placement): run `--base HEAD` on a clean tree first; the A/A spread it prints is the smallest
difference this machine can tell.

`--op moe`: one MoE layer (top-4 of 32 experts, gate_up + SwiGLU + down, MXFP4) at a preset's widths.
`--op linear`: one bf16 linear layer, the preset's lm_head (bench, 16384 x 768) or its fused qkv (20b, 5120 x 2880).
`--rows` tokens; the weights cycle through 1 GiB so they come from memory, as in a decode step. Each round times 30
calls of each build (the median is kept); the per-round time ratio new/base is printed, so machine noise shows as
spread, not as a result.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from gptoss.model import kernels

SHAPES = {"20b": (2880, 2880), "bench": (768, 768)}
LINEAR_SHAPES = {"20b": (5120, 2880), "bench": (16384, 768)}
EXPERTS, TOP_K = 32, 4


def build_revision(rev: str | None, side: str = "base"):
    """The kernels' C++ sources (csrc/, headers included) as committed at `rev` (None: the working tree's),
    compiled as an extension module of its own; `side` keeps two builds of the same source apart."""
    csrc = "model/kernels/csrc"
    root = Path(__file__).resolve().parents[2]
    if rev is None:
        files = {p.name: p.read_bytes() for p in sorted((root / csrc).iterdir()) if p.is_file()}
    else:
        names = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", f"{rev}:{csrc}"], check=True,
                               capture_output=True, text=True).stdout.split()
        files = {name: subprocess.run(["git", "-C", str(root), "show", f"{rev}:{csrc}/{name}"], check=True,
                                      capture_output=True).stdout for name in names}
    directory = Path(tempfile.mkdtemp())
    digest = hashlib.sha256()
    for name, text in sorted(files.items()):
        (directory / name).write_bytes(text)
        digest.update(name.encode() + text)
    sources = sorted(directory / name for name in files if name.endswith(".cpp"))
    return kernels.build_library(f"gptoss_kernels_ab_{side}_" + digest.hexdigest()[:12], sources)


def copies_in_a_gib(nbytes: int) -> int:
    return max(2, 2**30 // nbytes)


def moe_layer(shape: str, rows: int, g: torch.Generator):
    """run(module, advance=True): one MoE layer call on the next copy of the weights."""
    hidden, inter = SHAPES[shape]
    copies = copies_in_a_gib(EXPERTS * 3 * inter * hidden * 17 // 32)

    def mxfp4(m, k):
        return (torch.randint(0, 256, (EXPERTS, m, k // 32, 16), dtype=torch.uint8, generator=g),
                torch.randint(118, 124, (EXPERTS, m, k // 32), dtype=torch.uint8, generator=g))

    weights = [(*mxfp4(2 * inter, hidden), *mxfp4(hidden, inter)) for _ in range(copies)]
    gate_up_bias, down_bias = torch.zeros(EXPERTS, 2 * inter), torch.zeros(EXPERTS, hidden)
    x = torch.randn(rows, hidden)
    gates = torch.softmax(torch.randn(rows, TOP_K), -1)
    chosen = [torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(rows)]) for _ in range(64)]
    state = {"i": 0}

    def run(module, advance=True):
        i = state["i"] = state["i"] + advance
        gu_b, gu_s, d_b, d_s = weights[i % copies]
        return module.mxfp4_moe(x, gates, chosen[i % 64], gu_b, gu_s, gate_up_bias, d_b, d_s, down_bias, 0,
                                1.702, 7.0)

    return run


def linear_layer(shape: str, rows: int, g: torch.Generator):
    """run(module, advance=True): one bf16 linear call on the next copy of the weight."""
    m, k = LINEAR_SHAPES[shape]
    copies = copies_in_a_gib(m * k * 2)
    weights = [torch.randn(m, k, generator=g).to(torch.bfloat16) for _ in range(copies)]
    bias = torch.randn(m, generator=g)
    x = torch.randn(rows, k, generator=g)
    state = {"i": 0}

    def run(module, advance=True):
        i = state["i"] = state["i"] + advance
        return module.bf16_linear(x, weights[i % copies], bias)

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD~1", help="git revision of the kernels to compare against")
    ap.add_argument("--op", choices=("moe", "linear"), default="moe")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="20b")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, new = build_revision(args.base), build_revision(None, "new")
    for module in (base, new):  # the distances tuned for this machine when the extension loaded
        module.set_prefetch(*kernels.extension().prefetch())
    g = torch.Generator().manual_seed(0)
    run = (moe_layer if args.op == "moe" else linear_layer)(args.shape, args.rows, g)
    expected = run(base)
    torch.testing.assert_close(run(new, advance=False), expected, rtol=1e-4, atol=1e-4)
    medians: dict[str, list[float]] = {"base": [], "new": []}
    for r in range(args.rounds):
        for name, module in (("base", base), ("new", new))[:: 1 if r % 2 == 0 else -1]:
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                run(module)
                times.append(time.perf_counter() - t0)
            medians[name].append(sorted(times)[len(times) // 2])
    what = "MoE layer" if args.op == "moe" else "bf16 linear"
    print(f"{what} at {args.shape} widths, {args.rows} row(s), {args.threads} threads, kernels {kernels.isa()}")
    for name, ts in medians.items():
        print(f"  {name:5s} median of rounds {sorted(ts)[len(ts) // 2] * 1e6:8.0f} us")
    print("  new/base time per round: " + " ".join(f"{n / b:.2f}" for n, b in zip(medians["new"], medians["base"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
