"""Command-line options shared by the compile and generate tools: the runtime's static-shape settings."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_runtime_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--backend", default="inductor", choices=["eager", "inductor", "torchair"])
    ap.add_argument("--device", default=None, help="cpu (default), cuda, npu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, else bfloat16")
    ap.add_argument("--max-batch-size", type=int, default=None, help="default 8 (or the artifacts' setting)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="default 4096 (or the artifacts' setting)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="default 256 (or the artifacts' setting)")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated batch buckets to build graphs for, e.g. 1,8")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel size (run under torchrun)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (artifacts are built per thread count)")


def runtime_kwargs(args, artifacts: str | None) -> dict:
    """Settings from the flags; where a flag is absent, from the artifacts' manifest, then the defaults."""
    saved = {}
    if artifacts and (Path(artifacts) / "manifest.json").is_file():
        saved = json.loads((Path(artifacts) / "manifest.json").read_text())["key"].get("shapes", {})
    pick = lambda flag, key, default: flag if flag is not None else saved.get(key, default)  # noqa: E731
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else saved.get("batch_sizes")
    kwargs = dict(backend=args.backend, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                  max_batch_size=pick(args.max_batch_size, "max_batch_size", max(batch_sizes or [8])),
                  max_seq_len=pick(args.max_seq_len, "max_seq_len", 4096),
                  prefill_chunk=pick(args.prefill_chunk, "prefill_chunk", 256),
                  batch_sizes=batch_sizes, artifacts=artifacts)
    if args.tp is not None:
        kwargs["tp_size"] = args.tp
    return kwargs


def apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def run_cli(main) -> None:
    """Run a tool's main; a refusal the user can act on (bad flag value, mismatched artifacts, unloadable
    checkpoint) prints one line instead of a traceback."""
    import sys

    from gptoss.graph.artifacts import ArtifactMismatch
    from gptoss.model.safetensors_reader import CheckpointError

    try:
        raise SystemExit(main())
    except (ArtifactMismatch, CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        from gptoss.runtime.distributed import is_main_process
        if is_main_process():  # under torchrun every rank meets the same refusal: say it once
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
