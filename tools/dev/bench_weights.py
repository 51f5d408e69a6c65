"""Published vs dense weights on one checkpoint, same process, same threads, interleaved rounds.

    python -m gptoss.tools.dev.bench_weights --model checkpoints/bench [--threads 2] [--rounds 3] [--backends eager,inductor]
                                      [--weights published,dense] [--peer] [--profile]

Per (weights, backend): decode tokens/s at batch 1 and 8, prefill tokens/s of a 512-token prompt (best of the
rounds; rounds alternate between the configurations so machine noise hits all alike); the bytes of weights one
decoded token reads (batch 1: attention, router, the top-k experts, lm_head, one embedding row) and the bandwidth
efficiency = bytes x tok/s / copy bandwidth, the copy bandwidth measured in the same run. --profile: where a
batch-1 decode step's time goes (torch.profiler, eager), published weights. The CPU's instruction set (the
kernels' path) is printed with every figure.

--peer: llama.cpp on the same checkpoint (its MXFP4 GGUF, see llama_peer.py) joins every round, in its own process
after this process's engines have finished theirs, so the engines never compute at once and machine noise hits
every engine of a round alike; the table then gives each engine's ratio to it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gptoss.model import kernels
from gptoss.runtime import Runtime
from gptoss.tools.dev import llama_peer
from gptoss.tools.dev.bench import active_weight_bytes, copy_bandwidth, fma_summary, last_level_cache_bytes

PROMPT, SHORT, DECODE = 512, 32, 32
PEER_KEYS = {"decode_b1": "decode_b1_tok_s", "decode_b8": "decode_b8_tok_s", "prefill512": "prefill_tok_s"}


def prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n * 1000 + length)
    return [torch.randint(10, vocab - 10, (length,), generator=g).tolist() for _ in range(n)]


def one_round(rt) -> dict:
    vocab, out = rt.config.vocab_size, {}
    rt.generate(prompts(vocab, 1, PROMPT), max_new_tokens=1, ignore_eos=True)
    out["prefill512"] = PROMPT / rt.last_stats.prefill_s
    for batch in (1, 8):
        rt.generate(prompts(vocab, batch, SHORT), max_new_tokens=DECODE, ignore_eos=True)
        s = rt.last_stats
        out[f"decode_b{batch}"] = s.decode_steps * batch / s.decode_s
    return out


def profile_decode(model: str, weights: str, steps: int = 20) -> str:
    """A one-token prompt (eager: a one-token chunk), then `steps` decode steps: the table is the steps."""
    from torch.profiler import ProfilerActivity, profile
    rt = Runtime.from_pretrained(model, weights=weights, max_batch_size=1, max_seq_len=128, progress=False)
    p = prompts(rt.config.vocab_size, 1, 1)
    rt.generate(p, max_new_tokens=4, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rt.generate(p, max_new_tokens=steps, ignore_eos=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", default="eager,inductor")
    ap.add_argument("--weights", default="published,dense", help="weight formats to measure (comma-separated)")
    ap.add_argument("--peer", action="store_true", help="also measure llama.cpp (MXFP4 GGUF) in every round")
    ap.add_argument("--peer-build", choices=sorted(llama_peer.BUILDS), default="native",
                    help="the llama.cpp build --peer runs (avx2: beside GPTOSS_CPU_ISA=avx2 on an AVX-512 machine)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    isa = kernels.isa()
    # prompts run eagerly on both backends (inductor on CPU compiles decode steps only), so the decode rounds'
    # 32-token prompts are not padded to the 512-token chunk
    settings = dict(max_batch_size=8, max_seq_len=1024, prefill_chunk=512, batch_sizes=[1, 8], progress=False)

    runtimes = {}
    for backend in args.backends.split(","):
        for weights in args.weights.split(","):
            t0 = time.perf_counter()
            runtimes[(weights, backend)] = Runtime.from_pretrained(args.model, backend=backend, weights=weights,
                                                                   **settings)
            print(f"built {weights}/{backend} in {time.perf_counter() - t0:.1f}s", flush=True)
    for rt in runtimes.values():  # warm-up
        rt.generate(prompts(rt.config.vocab_size, 1, SHORT), max_new_tokens=4, ignore_eos=True)

    best: dict = {k: {} for k in runtimes}
    peer: dict = {}
    bandwidth = 0.0
    rounds = []  # every round's figures: the best-of table hides how much a noisy machine moved between rounds
    for r in range(args.rounds):
        copy = copy_bandwidth(256, 3)
        bandwidth = max(bandwidth, copy)
        this_round = {"copy_GBps": copy / 1e9}
        for key, rt in runtimes.items():
            figures = this_round["/".join(key)] = one_round(rt)
            for name, value in figures.items():
                best[key][name] = max(best[key].get(name, 0.0), value)
        if args.peer:
            theirs = llama_peer.measure(args.model, args.threads, "mxfp4", DECODE, rounds=1,
                                        venv=llama_peer.venv_for(args.peer_build),
                                        log=lambda m: print(m, file=sys.stderr))
            peer["engine"], peer["built_for"] = theirs["engine"], theirs["built_for"]
            this_round["llama.cpp"] = {name: theirs[key] for name, key in PEER_KEYS.items()}
            for name, key in PEER_KEYS.items():
                peer[name] = max(peer.get(name, 0.0), theirs[key])
        rounds.append(this_round)
        engines = "; ".join(f"{k} " + " ".join(f"{n} {v:.1f}" for n, v in f.items())
                            for k, f in this_round.items() if k != "copy_GBps")
        print(f"round {r + 1}/{args.rounds}: copy {copy / 1e9:.1f} GB/s; {engines}", flush=True)

    cache = last_level_cache_bytes()
    report = {"isa": isa, "prefetch": kernels.prefetch(), "threads": args.threads, "copy_GBps": bandwidth / 1e9,
              "fma_GMACps_a_core": kernels.fma_rates(),
              "last_level_cache_bytes": cache, "results": [], "rounds": rounds}
    print(f"\nCPU kernels: {isa} (this CPU runs {kernels.available_isas()}), prefetch {kernels.prefetch()}; "
          f"{args.threads} threads; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {fma_summary(report['fma_GMACps_a_core'])}")
    print(f"{'weights':<10} {'backend':<9} {'MB/token':>9} {'decode b1':>10} {'decode b8':>10} {'prefill512':>11} "
          f"{'bw eff b1':>10}")
    for (weights, backend), res in best.items():
        nbytes = active_weight_bytes(runtimes[(weights, backend)].model)
        eff = nbytes * res["decode_b1"] / bandwidth
        row = dict(weights=weights, backend=backend, bytes_per_token=nbytes, bandwidth_efficiency_b1=eff, **res)
        ratios = ""
        if peer:
            row["vs_peer"] = {name: res[name] / peer[name] for name in PEER_KEYS}
            ratios = "   vs llama.cpp: " + ", ".join(f"{n} {v:.2f}x" for n, v in row["vs_peer"].items())
        report["results"].append(row)
        print(f"{weights:<10} {backend:<9} {nbytes / 1e6:9.1f} {res['decode_b1']:10.1f} {res['decode_b8']:10.1f} "
              f"{res['prefill512']:11.1f} {eff:10.1%}   [{isa}]{ratios}")
    largest = max(row["bytes_per_token"] for row in report["results"])
    if cache and largest <= cache:
        print(f"note: a token's weights ({largest / 1e6:.1f} MB at most) fit in this CPU's {cache / 2**20:.0f} MiB "
              f"last-level cache, so a decode step may read them from the cache: bandwidth efficiency here is not a "
              f"memory figure (the copy bandwidth is: its buffers are twice the cache)")
    if peer:
        report["peer"] = peer
        print(f"{'llama.cpp':<10} {'mxfp4':<9} {'':>9} {peer['decode_b1']:10.1f} {peer['decode_b8']:10.1f} "
              f"{peer['prefill512']:11.1f} {'':>10}   [{peer['built_for']}] {peer['engine']}")
        print("ratios to llama.cpp round by round (same round, best of neither):")
        for i, rnd in enumerate(rounds):
            for key in runtimes:
                mine = rnd["/".join(key)]
                print(f"  round {i + 1} {'/'.join(key):<20} " + ", ".join(
                    f"{n} {mine[n] / rnd['llama.cpp'][n]:.2f}x" for n in PEER_KEYS))
    if args.profile:
        print(f"\nprofile of 20 decode steps, batch 1, published/eager [{isa}]:\n"
              f"{profile_decode(args.model, 'published')}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
