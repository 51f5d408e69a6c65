"""What the user-facing commands share: the runtime's settings as flags, and one-line refusals."""
from __future__ import annotations

import argparse
import sys

from gptoss.graph import BACKENDS
from gptoss.runtime.settings import DTYPES, WEIGHT_FORMATS, Settings


def add_runtime_args(ap: argparse.ArgumentParser, *, backend_default: str | None = None) -> None:
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--backend", default=None, choices=list(BACKENDS),
                    help=f"default: the artifacts' backend, else {backend_default or 'eager'}")
    ap.add_argument("--device", default=None, help="cpu, cuda, npu (default: the backend's first device)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: float32 on CPU, else bfloat16")
    ap.add_argument("--weights", default=None, choices=list(WEIGHT_FORMATS),
                    help="published: MXFP4 experts and bf16 matrices as in the checkpoint (CPU kernels; default on "
                         "CPU); dense: every weight in --dtype (default elsewhere)")
    ap.add_argument("--no-mmap", dest="mmap", action="store_false",
                    help="published weights: copy the MXFP4 experts and the embedding into the process instead of "
                         "using them in place from the mapped checkpoint (the default: no copy, the page cache "
                         "keeps them between runs, and the files must not change while the model runs)")
    ap.add_argument("--max-batch-size", type=int, default=None, help="default 8 (or the artifacts' setting)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="default 4096 (or the artifacts' setting)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="default 256 (or the artifacts' setting)")
    ap.add_argument("--prefill-granule", type=int, default=None,
                    help="a prompt's first and last chunk round up to a multiple of this (a power of two; 0: to a "
                         "power of two). Default 1 where prompts run eagerly (no padding), else 0 (fewer graphs)")
    ap.add_argument("--interleave-chunk", type=int, default=None,
                    help="serving: prompt tokens prefilled per step while other requests decode (a power of two; "
                         "default 256, or the artifacts' setting; smaller: shorter stalls of the running streams, "
                         "less throughput, see BENCHMARKS.md)")
    ap.add_argument("--mixed-steps", action=argparse.BooleanOptionalAction, default=None,
                    help="serving: a prompt's interleave chunk and the running requests' decode step run as one "
                         "graph (a graph per batch x kv_len and one more cache row). Off by default (a runtime that "
                         "never serves would pay for it); an AMX CPU server gained ~5%% throughput, a Zen 5 one "
                         "nothing measurable (BENCHMARKS.md)")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated batch buckets to build graphs for, e.g. 1,8")
    ap.add_argument("--compiled", default=None, choices=["all", "decode"],
                    help="inductor: graphs for every entry point or for decode steps only, prompts then running "
                         "eagerly (fewer graphs to build, prompts padded only to --prefill-granule). Default: decode "
                         "on CPU (a 256-token chunk of the bench checkpoint took the same time eager, and eager "
                         "chunks are unpadded), all on accelerators, or the artifacts' setting")
    ap.add_argument("--window-cache", default=None, choices=["ring", "full"],
                    help="ring: sliding-window layers keep only their window (default); full: max_seq_len slots")
    ap.add_argument("--kv-buckets", action=argparse.BooleanOptionalAction, default=None,
                    help="attention reads the power of two of cache slots that covers the context (a graph per "
                         "kv_len); --no-kv-buckets: the whole cache every step (one kv_len). Default: off on CPU in "
                         "float32, whose attention kernels skip the slots a query does not see; on elsewhere")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel size (run under torchrun)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the artifacts' count)")
    ap.set_defaults(backend_default=backend_default)


def settings_from_args(args, **fixed) -> Settings:
    """The one Settings object a command runs with: its flags, and `fixed` (e.g. artifacts=..., rebuild=...).
    Fields left unset are filled by the runtime from the artifacts' manifest, then the defaults."""
    backend = args.backend
    if backend is None and fixed.get("artifacts") is None:
        backend = args.backend_default
    batch_sizes = None
    if args.batch_sizes:
        try:
            batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
        except ValueError:
            raise ValueError(f"--batch-sizes takes comma-separated ints, got {args.batch_sizes!r}") from None
    return Settings(backend=backend, device=args.device, dtype=args.dtype, weights=args.weights,
                    max_batch_size=args.max_batch_size,
                    max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk, batch_sizes=batch_sizes,
                    interleave_chunk=args.interleave_chunk, mixed_steps=args.mixed_steps,
                    prefill_granule=args.prefill_granule, compiled=args.compiled,
                    window_cache=args.window_cache, kv_buckets=args.kv_buckets,
                    tp_size=args.tp, threads=args.threads, mmap=args.mmap, **fixed)


def run_cli(main) -> None:
    """Run a command's main; a refusal the user can act on (bad flag value, mismatched artifacts, unloadable
    checkpoint) prints one line instead of a traceback."""
    from gptoss.graph import ArtifactMismatch
    from gptoss.model.safetensors_reader import CheckpointError
    from gptoss.runtime.distributed import is_main_process

    try:
        raise SystemExit(main())
    except (ArtifactMismatch, CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        if is_main_process():  # under torchrun every rank meets the same refusal: say it once
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
