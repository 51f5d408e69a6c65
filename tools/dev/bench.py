"""Benchmark: this runtime eager and compiled vs transformers on the same weights, against the memory roofline.

    python -m gptoss.tools.dev.bench --model checkpoints/bench [--threads 2] [--decode-tokens 32] [--json out.json]

Measures, at one thread count for everything:
- prefill tokens/s of a 512-token prompt; decode tokens/s at batch 1 and 8 (greedy, EOS ignored);
- the decode roofline: bytes of weights one decoded token must read (attention, norms, router, top-k experts,
  lm_head) over the copy bandwidth measured in this run (STREAM-style: bytes read + written per second);
- cold start (`gptoss.tools.compile` into an empty directory, then the first token from a new process) vs warm
  start (a new process loading those artifacts, to first token), both through the public commands;
- eager decode step time around context 128 with max_seq_len 8192 vs 256 (does decode work follow the context?).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptoss.model import kernels
from gptoss.runtime import Runtime, Settings

PROMPT_LEN, SHORT_PROMPT = 512, 32


def last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache this machine reports (sysfs), 0 when it says nothing. Some VMs report hundreds of
    MiB of L3 (seen: 480 MiB), enough to hold a small model's whole decode step."""
    sizes = []
    for f in Path(cache_dir).glob("index*/size"):
        text = f.read_text().strip()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            pass
    return max(sizes, default=0)


def copy_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes read + written per second by one large copy (best of `repeats`). Each buffer is at least twice the
    last-level cache, so the figure is memory's, not the cache's."""
    megabytes = max(megabytes, 2 * last_level_cache_bytes() // 2**20)
    src = torch.rand(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def fma_summary(rates: dict[str, float]) -> str:
    """One core's fp32 multiply-add rates at each vector width (`kernels.fma_rates()`), for a report's header:
    machines that report the same CPU differ by 2x here, which moves compute-bound figures such as an MXFP4
    decode's."""
    return "fp32 FMA a core: " + (", ".join(f"{isa} {rate:.1f}" for isa, rate in rates.items()) + " G MAC/s"
                                   if rates else "not measured")


def active_weight_bytes(model) -> int:
    """Weights read to decode one token at batch 1: everything but the unrouted experts and embedding rows."""
    c, total = model.config, 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.startswith("embed_tokens"):
            nbytes = p.shape[1] * p.element_size()  # one row
        elif ".mlp." in name and ".router." not in name:
            nbytes = nbytes * c.num_experts_per_tok // c.num_local_experts
        total += nbytes
    return total


def _prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n * 1000 + length)
    return [torch.randint(10, vocab - 10, (length,), generator=g).tolist() for _ in range(n)]


def bench_runtime(rt, decode_tokens: int) -> dict:
    vocab = rt.config.vocab_size
    out = {}
    rt.generate(_prompts(vocab, 1, PROMPT_LEN), max_new_tokens=2, ignore_eos=True)  # warm-up
    times = []
    for _ in range(3):
        rt.generate(_prompts(vocab, 1, PROMPT_LEN), max_new_tokens=1, ignore_eos=True)
        times.append(rt.last_stats.prefill_s)
    out["prefill_tok_s"] = PROMPT_LEN / min(times)
    for batch in (1, 8):
        rt.generate(_prompts(vocab, batch, SHORT_PROMPT), max_new_tokens=4, ignore_eos=True)
        rt.generate(_prompts(vocab, batch, SHORT_PROMPT), max_new_tokens=decode_tokens, ignore_eos=True)
        s = rt.last_stats
        out[f"decode_b{batch}_tok_s"] = s.decode_steps * batch / s.decode_s
    return out


def bench_transformers(model_dir: str, decode_tokens: int) -> dict:
    import transformers

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    kwargs = {}
    if cfg.get("quantization_config", {}).get("quant_method") == "mxfp4":
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = transformers.GptOssForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    vocab, out = cfg["vocab_size"], {}
    with torch.no_grad():
        ids = torch.tensor(_prompts(vocab, 1, PROMPT_LEN))
        model(ids[:, :64])
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
        out["prefill_tok_s"] = PROMPT_LEN / min(times)
        for batch in (1, 8):
            ids = torch.tensor(_prompts(vocab, batch, SHORT_PROMPT))
            gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **gen)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, **gen)
            total = time.perf_counter() - t0
            out[f"decode_b{batch}_tok_s"] = (decode_tokens - 1) * batch / (total - first)
    return out


def time_to_first_token(model_dir: str, artifacts: str, threads: int, settings: Settings) -> float:
    """A new process through the public command: import, load weights, build or load graphs (compiling into an
    empty `artifacts`), generate one token. Seconds, wall clock."""
    cmd = [sys.executable, "-m", "gptoss.tools.generate", "--model", model_dir, "--backend", "inductor",
           "--threads", str(threads), "--max-new-tokens", "1", "--prompt", "a b c",
           "--max-batch-size", str(settings.max_batch_size), "--max-seq-len", str(settings.max_seq_len),
           "--prefill-chunk", str(settings.prefill_chunk),
           "--batch-sizes", ",".join(map(str, settings.batch_sizes))]
    if not Path(artifacts).exists():  # cold: compile into the directory first, as a user would
        cmd_compile = [c if c != "gptoss.tools.generate" else "gptoss.tools.compile" for c in cmd[:-4]]
        t0 = time.perf_counter()
        _run(cmd_compile + ["--out", artifacts])
        _run(cmd + ["--artifacts", artifacts])
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    _run(cmd + ["--artifacts", artifacts])
    return time.perf_counter() - t0


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def decode_step_vs_slots(model_dir: str) -> dict:
    """Eager decode at batch 1 around context 128, with max_seq_len 256 vs 8192 (does the work follow the
    context, or the cache size?)."""
    out = {}
    for slots in (256, 8192):
        rt = Runtime.from_pretrained(model_dir, Settings(backend="eager", max_batch_size=1, max_seq_len=slots,
                                                         prefill_chunk=128, progress=False))
        prompt = _prompts(rt.config.vocab_size, 1, 100)
        rt.generate(prompt, max_new_tokens=4, ignore_eos=True)
        rt.generate(prompt, max_new_tokens=24, ignore_eos=True)
        s = rt.last_stats
        out[f"decode_ms_ctx128_slots{slots}"] = 1e3 * s.decode_s / s.decode_steps
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # 12 graphs: keeps the cold compile short
    settings = Settings(backend="inductor", max_batch_size=8, max_seq_len=PROMPT_LEN + 128, prefill_chunk=PROMPT_LEN,
                        min_prefill_chunk=PROMPT_LEN, batch_sizes=(1, 8), threads=args.threads, progress=False,
                        compiled="all")
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
              "threads": args.threads, "settings": settings.to_dict()}
    report["copy_GBps"] = copy_bandwidth() / 1e9
    report["fma_GMACps_a_core"] = kernels.fma_rates()

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = str(Path(tmp) / "artifacts")
        report["cold_start_s"] = time_to_first_token(args.model, artifacts, args.threads, settings)
        report["warm_start_s"] = time_to_first_token(args.model, artifacts, args.threads, settings)
        compiled = Runtime.from_pretrained(args.model, settings.replace(artifacts=artifacts))
        report["compiled"] = bench_runtime(compiled, args.decode_tokens)
    report["active_bytes_per_token"] = active_weight_bytes(compiled.model)
    report["roofline_decode_b1_tok_s"] = report["copy_GBps"] * 1e9 / report["active_bytes_per_token"]
    del compiled
    eager = Runtime.from_pretrained(args.model, settings.replace(backend="eager"))
    report["eager"] = bench_runtime(eager, args.decode_tokens)
    del eager
    report.update(decode_step_vs_slots(args.model))
    if not args.skip_transformers:
        report["transformers"] = bench_transformers(args.model, args.decode_tokens)
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_table(r: dict) -> None:
    rows = [("this runtime, eager", r["eager"]), ("this runtime, compiled (inductor)", r["compiled"])]
    if "transformers" in r:
        rows.append(("transformers GptOssForCausalLM", r["transformers"]))
    print(f"machine: {r['machine']}; threads {r['threads']}; copy bandwidth {r['copy_GBps']:.1f} GB/s; "
          f"{fma_summary(r.get('fma_GMACps_a_core', {}))}")
    print("| engine | prefill 512 tok/s | decode b1 tok/s | decode b8 tok/s |")
    print("|---|---|---|---|")
    for name, v in rows:
        print(f"| {name} | {v['prefill_tok_s']:.0f} | {v['decode_b1_tok_s']:.1f} | {v['decode_b8_tok_s']:.1f} |")
    roof = r["roofline_decode_b1_tok_s"]
    c = r["compiled"]
    print(f"decode roofline b1: {r['active_bytes_per_token'] / 1e6:.1f} MB/token -> {roof:.1f} tok/s; "
          f"compiled b1 = {100 * c['decode_b1_tok_s'] / roof:.0f}% of roofline")
    if "transformers" in r:
        t = r["transformers"]
        print(f"compiled vs transformers: decode b1 {c['decode_b1_tok_s'] / t['decode_b1_tok_s']:.1f}x, "
              f"prefill {c['prefill_tok_s'] / t['prefill_tok_s']:.1f}x")
    print(f"batch 8 vs batch 1 decode: {c['decode_b8_tok_s'] / c['decode_b1_tok_s']:.1f}x")
    print(f"cold start (compile) {r['cold_start_s']:.1f}s, warm start from artifacts {r['warm_start_s']:.1f}s "
          f"({100 * r['warm_start_s'] / r['cold_start_s']:.0f}%)")
    print(f"decode step at context 128: {r['decode_ms_ctx128_slots256']:.2f} ms with 256 slots, "
          f"{r['decode_ms_ctx128_slots8192']:.2f} ms with 8192 slots")


if __name__ == "__main__":
    raise SystemExit(main())
