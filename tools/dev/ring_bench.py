"""Sliding layers on ring caches vs full-length caches, on a real checkpoint, eager on CPU:

- memory: a fresh process per setting loads the runtime (batch 1, `--max-seq-len`) and runs one decode step at
  the end of the context; its RSS (VmRSS) and the cache's bytes are reported;
- decode step time at long context: one process, one model, two runtimes (one per setting) stepping a batch-1
  decode at position `--context` (kv_len bucket of that position) in interleaved rounds; medians and their ratio.

    python -m gptoss.tools.dev.ring_bench --model checkpoints/bench [--max-seq-len 131072] [--context 30000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from gptoss.model.loader import load_model
from gptoss.runtime import Runtime, Settings

MODES = ("full", "ring")


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def _settings(args, mode: str) -> Settings:
    return Settings(max_batch_size=1, batch_sizes=(1,), max_seq_len=args.max_seq_len, window_cache=mode,
                    threads=args.threads, progress=False)


def _step(rt: Runtime, pos: int) -> float:
    ids, p = torch.tensor([7]), torch.tensor([pos])
    t0 = time.perf_counter()
    with torch.no_grad():
        rt._decode(ids, p, rt.shapes.kv_len(pos + 1))
    return time.perf_counter() - t0


def memory(args, mode: str) -> dict:
    """Run in a fresh process: RSS after loading the runtime and one decode step at the end of the context."""
    before = _rss()
    rt = Runtime.from_pretrained(args.model, _settings(args, mode))
    _step(rt, args.max_seq_len - 2)
    return {"mode": mode, "rss": _rss(), "rss_before_load": before, "kv_bytes": rt.cache.nbytes,
            "cache_slots": sorted({k.shape[1] for k in rt.cache.keys})}


def step_times(args) -> dict:
    model = load_model(args.model, dtype=torch.float32)
    runtimes = {m: Runtime(model, args.model, _settings(args, m)) for m in MODES}
    times = {m: [] for m in MODES}
    for m in MODES:
        _step(runtimes[m], args.context)  # warm-up
    for r in range(args.rounds):
        for m in (MODES if r % 2 == 0 else MODES[::-1]):  # interleaved, alternating order
            times[m].append(_step(runtimes[m], args.context))
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"context": args.context, "kv_len": runtimes["ring"].shapes.kv_len(args.context + 1),
            "median_s": med, "ring_over_full": med["ring"] / med["full"], "rounds": args.rounds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-seq-len", type=int, default=131072)
    ap.add_argument("--context", type=int, default=30000, help="decode position for the step-time comparison")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true", help="step times only")
    ap.add_argument("--memory-only", default=None, choices=MODES, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.memory_only:
        print(json.dumps(memory(args, args.memory_only)))
        return 0
    for mode in () if args.skip_memory else MODES:
        out = subprocess.run([sys.executable, "-m", "gptoss.tools.dev.ring_bench", *(argv or sys.argv[1:]),
                              "--memory-only", mode], capture_output=True, text=True, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        print(f"memory {mode:>4}: RSS {m['rss'] / 2**20:8.1f} MiB, KV cache {m['kv_bytes'] / 2**20:8.1f} MiB, "
              f"slots per layer {m['cache_slots']}")
    t = step_times(args)
    print(f"decode step at position {t['context']} (kv_len {t['kv_len']}), median of {t['rounds']} interleaved "
          f"rounds: full {t['median_s']['full'] * 1e3:.2f} ms, ring {t['median_s']['ring'] * 1e3:.2f} ms, "
          f"ring/full {t['ring_over_full']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
