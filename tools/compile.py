"""Compile every prefill/decode graph a runtime configuration needs, ahead of time, into an artifact directory.

    python -m gptoss.tools.compile --model checkpoints/bench --out artifacts/bench --max-seq-len 1024 --batch-sizes 1,8
    torchrun --nproc-per-node 2 -m gptoss.tools.compile --tp 2 --model checkpoints/bench --out artifacts/bench-tp2

A later process runs from it without tracing or compiling (`python -m gptoss.tools.generate --artifacts ...` or
`Runtime.from_pretrained(..., artifacts=DIR)`), with the shape settings it was built with. Each rank's graphs and
manifest.json are in `<out>/tp<N>-rank<r>`; running with anything else than they were built for is refused.
`--force` rebuilds a directory built for something else.
"""
from __future__ import annotations

import argparse
import time

from gptoss.runtime import Runtime

from .cli import add_runtime_args, run_cli, settings_from_args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runtime_args(ap, backend_default="inductor")
    ap.add_argument("--out", required=True, help="artifact directory to create")
    ap.add_argument("--force", action="store_true", help="rebuild if the directory holds other artifacts")
    args = ap.parse_args(argv)
    if args.backend is None:
        args.backend = "inductor"
    if args.backend == "eager":
        ap.error("--backend eager compiles nothing; choose inductor or torchair")
    t0 = time.perf_counter()
    rt = Runtime.from_pretrained(args.model, settings_from_args(args, artifacts=args.out, rebuild=args.force))
    how = f"compiled in {rt.graphs.compile_seconds:.1f}s" if rt.graphs.loaded_from is None else "already up to date"
    if rt.is_main_process:  # under torchrun every rank builds its own graphs
        per_rank = f" per rank, {rt.settings.tp_size} ranks" if rt.settings.tp_size > 1 else ""
        eager = f" ({len(rt.graphs.eager)} prompt shapes left to run eagerly)" if rt.graphs.eager else ""
        print(f"{rt.graphs.compiled} {rt.backend} graphs{per_rank}{eager} for {args.model} in {args.out}: {how} "
              f"(total {time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
