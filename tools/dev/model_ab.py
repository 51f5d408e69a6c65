"""The whole runtime at a git revision against the working tree's, alternated turn by turn on the same machine.

    python -m gptoss.tools.dev.model_ab --base HEAD~1 [--model checkpoints/bench] [--mode decode|prefill]
                                        [--batch 1] [--turns 30] [--threads 2]

On these hosts memory bandwidth drifts by 2x over minutes, so two benchmark runs a few minutes apart cannot tell a
5% change. Here both versions stay loaded, each in its own process (the base from a `git worktree` of the
revision, imported ahead of the installed package), and take turns: one `generate` each (64 decode steps, or one
512-token prefill), the order swapped every turn. The median of the per-turn ratios new/base is the result; the
spread of the ratios is the noise. Graphs are compiled once per version into build/model_ab/<revision>/ (minutes
on first use). Both processes use the instruction set's default prefetch distances (tuning at load picks per
process, which would add its own difference).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PREFILL = 512


def worker(args) -> None:
    """One runtime answering turns on stdin: a line "go" -> one generate, its tokens/s on stdout."""
    import torch

    from gptoss.runtime import Runtime
    rt = Runtime.from_pretrained(args.model, backend="inductor", artifacts=args.artifacts, threads=args.threads,
                                 max_batch_size=max(8, args.batch), max_seq_len=1024, prefill_chunk=PREFILL,
                                 batch_sizes=(1, 8) if args.batch in (1, 8) else (args.batch,), progress=False,
                                 rebuild=True)  # the working tree's artifacts: rebuilt after each edit
    g = torch.Generator().manual_seed(0)
    vocab = rt.config.vocab_size
    length = PREFILL if args.mode == "prefill" else 16
    prompts = [torch.randint(10, vocab - 10, (length,), generator=g).tolist() for _ in range(args.batch)]
    rt.generate(prompts, max_new_tokens=8, ignore_eos=True)
    print("ready", flush=True)
    for _ in sys.stdin:
        if args.mode == "prefill":
            rt.generate(prompts, max_new_tokens=1, ignore_eos=True)
            rate = length * args.batch / rt.last_stats.prefill_s
        else:
            rt.generate(prompts, max_new_tokens=64, ignore_eos=True)
            rate = rt.last_stats.decode_steps * args.batch / rt.last_stats.decode_s
        print(rate, flush=True)


def checkout(rev: str) -> tuple[str, Path]:
    """A worktree of `rev` laid out as an importable `gptoss` package: (commit, directory for PYTHONPATH)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], check=True, capture_output=True,
                            text=True).stdout.strip()
    parent = ROOT / "build" / "model_ab" / commit[:12]
    if not (parent / "gptoss").exists():
        parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(parent / "gptoss"), commit],
                       check=True, capture_output=True)
    return commit, parent


def start(args, artifacts: Path, pythonpath: Path | None) -> subprocess.Popen:
    env = dict(os.environ, GPTOSS_PREFETCH="default")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
    # run as a file: a base revision may not have this module, and its package must be the one imported
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--artifacts", str(artifacts),
           "--model", args.model, "--mode", args.mode, "--batch", str(args.batch), "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise SystemExit(f"a runtime did not start ({' '.join(cmd)}): {line!r}")
    return proc


def turn(proc: subprocess.Popen) -> float:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision to compare the working tree against")
    ap.add_argument("--model", default="checkpoints/bench")
    ap.add_argument("--mode", choices=("decode", "prefill"), default="decode")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    commit, base_path = checkout(args.base)
    base = start(args, base_path / "artifacts", base_path)
    new = start(args, ROOT / "build" / "model_ab" / "worktree-artifacts", None)
    rates: dict[str, list[float]] = {"base": [], "new": []}
    try:
        for i in range(args.turns):
            order = (("base", base), ("new", new)) if i % 2 == 0 else (("new", new), ("base", base))
            for name, proc in order:
                rates[name].append(turn(proc))
    finally:
        for proc in (base, new):
            proc.stdin.close()
            proc.wait()
    ratios = [n / b for n, b in zip(rates["new"], rates["base"])]
    unit = "prefill tok/s" if args.mode == "prefill" else "decode tok/s"
    print(f"{args.mode}, batch {args.batch}, {args.threads} threads, {args.turns} turns; base {commit[:12]}")
    for name in ("base", "new"):
        print(f"  {name:4}  {unit}: median {statistics.median(rates[name]):.1f}, best {max(rates[name]):.1f}")
    print(f"  new/base per turn: median {statistics.median(ratios):.3f}, "
          f"quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}-{statistics.quantiles(ratios, n=4)[2]:.3f}")
    print("  " + " ".join(f"{r:.2f}" for r in ratios))
    if args.json:
        Path(args.json).write_text(json.dumps({"base": commit, **rates, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
