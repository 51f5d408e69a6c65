"""Peak resident memory of loading a checkpoint, against the size of the loaded model.

    python -m gptoss.tools.dev.load_memory --model checkpoints/bench [--tp 1 --rank 0] [--dtype float32]

Runs in its own process; prints JSON: baseline RSS (after imports), peak RSS, their difference, and the model's
bytes. The loader streams tensor by tensor, so the difference should stay close to the model's size.
"""
from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch

from gptoss.model.loader import load_model


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--weights", default="dense", choices=["dense", "published"])
    args = ap.parse_args(argv)
    baseline = rss_bytes()
    model = load_model(args.model, tp_size=args.tp, rank=args.rank, dtype=getattr(torch, args.dtype),
                       weights=args.weights)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "load_peak_delta": peak - baseline,
                      "model_bytes": model_bytes, "ratio": (peak - baseline) / model_bytes,
                      "file_bytes": sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
