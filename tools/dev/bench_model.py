"""Load a checkpoint through the public API and time it: ready time, peak RSS, decode tok/s per batch size.

    python -m gptoss.tools.dev.bench_model --model /work/ckpt-20b [--backend eager] [--threads 2]
                                           [--batches 1,4] [--max-seq-len 256] [--prefill-chunk 64]
                                           [--prefill 512] [--no-mmap]
                                           [--compiled decode --artifacts DIR [--batch-sizes 1,4]]

Made for the full-size presets (`make_checkpoint --preset 20b`) on a small machine: the shape settings default to
a short context, so the cache stays small beside the weights. Prompts are 32 random token ids per row; decode
runs 16 steps twice per batch size (EOS ignored) and the better is kept. With `--backend inductor --compiled decode
--artifacts DIR` the decode steps replay graphs built once into DIR (the first run compiles them: minutes at full
size); `--batch-sizes` limits the batch buckets built (default: powers of two up to the largest batch).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from gptoss.model import kernels
from gptoss.runtime import Runtime, Settings


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def resident() -> str:
    """The process's resident memory now, by kind (Linux): its own (anonymous) and the checkpoint's pages."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
        with open("/proc/self/smaps_rollup") as f:  # (of the file's pages, those on huge pages)
            fields.update(line.split(":", 1) for line in f if line.startswith("FilePmdMapped"))
    except OSError:
        return "resident memory by kind: unknown here"
    return ", ".join(f"{k} {int(v.split()[0]) / 1e6:.2f} GB" for k, v in fields.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=0, help="also time the prefill of one prompt this long")
    ap.add_argument("--no-mmap", dest="mmap", action="store_false",
                    help="copy the published experts and embedding instead of using the mapped checkpoint")
    ap.add_argument("--compiled", choices=["all", "decode"], help="inductor: which entry points are graphs")
    ap.add_argument("--artifacts", help="artifact directory (graphs built once, loaded by later runs)")
    ap.add_argument("--batch-sizes", help="batch buckets to build graphs for, e.g. 1,4")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    buckets = tuple(int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else None
    largest = max(batches + list(buckets or ()))
    t0 = time.perf_counter()
    rt = Runtime.from_pretrained(args.model, Settings(backend=args.backend, threads=args.threads,
                                                      max_seq_len=args.max_seq_len, max_batch_size=largest,
                                                      prefill_chunk=args.prefill_chunk, mmap=args.mmap,
                                                      compiled=args.compiled, artifacts=args.artifacts,
                                                      batch_sizes=buckets))
    graphs = f"{args.backend} ({args.compiled})" if args.compiled else args.backend
    print(f"ready in {time.perf_counter() - t0:.1f} s; peak RSS {peak_rss_gb():.2f} GB; "
          f"{graphs}, {args.threads} threads, kernels {kernels.isa()}, prefetch {kernels.prefetch()}", flush=True)
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        prompts = [torch.randint(0, rt.config.vocab_size, (32,), generator=g).tolist() for _ in range(batch)]
        rt.generate(prompts, max_new_tokens=2, ignore_eos=True)  # warm-up
        best = 0.0
        for _ in range(2):
            rt.generate(prompts, max_new_tokens=16, ignore_eos=True)
            best = max(best, rt.last_stats.decode_tokens_per_s)
        print(f"batch {batch}: decode {best:.2f} tok/s (all rows); prefill of {32 * batch} tokens "
              f"{rt.last_stats.prefill_s:.2f} s", flush=True)
    if args.prefill:
        prompt = torch.randint(0, rt.config.vocab_size, (args.prefill,), generator=g).tolist()
        rt.generate([prompt], max_new_tokens=1, ignore_eos=True)
        print(f"prefill of {args.prefill} tokens: {args.prefill / rt.last_stats.prefill_s:.2f} tok/s", flush=True)
    print(f"peak RSS {peak_rss_gb():.2f} GB; {resident()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
