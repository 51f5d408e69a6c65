"""The prepared CUDA check (run on a machine with an NVIDIA GPU; nothing here has run on one yet):

    python -m gptoss.tools.dev.cuda_check [--out DIR]

1. builds the tiny and bench checkpoints (random weights);
2. bf16 on CUDA: eager vs inductor (+ CUDA-graph decode): greedy tokens of 32 steps, batch 1 and 4 mixed lengths,
   and max |Δlogits| of the next-token logits after 16 prefixes of one sequence (bf16: reported, not asserted);
3. decode tokens/s at batch 1 and 8 on the bench checkpoint, eager vs compiled+CUDA graphs;
4. a serving step, compiled: a 64-token prompt chunk and a decode step of 1 or 8 rows as two graphs, or as one
   mixed graph (--mixed-steps; on an AMX CPU it saved ~5% of a serving run, BENCHMARKS.md);
5. writes a JSON report to --out (default: $OUT if set, else the current directory).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def _tokens(rt, prompts, n):
    return [r.token_ids for r in rt.generate(prompts, max_new_tokens=n, ignore_eos=True)]


def _decode_rate(rt, batch, steps=64):
    prompts = [[11 + i, 12, 13, 14] for i in range(batch)]
    rt.generate(prompts, max_new_tokens=4, ignore_eos=True)
    torch.cuda.synchronize()
    rt.generate(prompts, max_new_tokens=steps, ignore_eos=True)
    s = rt.last_stats
    return s.decode_steps * batch / s.decode_s


def mixed_vs_separate(rt, batch: int, rounds: int = 10) -> dict:
    """Median ms of one serving step: a prompt chunk of `interleave_chunk` tokens (on row 1, at position 128)
    plus a decode step of `batch` rows (at position 200), as two graphs or as one mixed graph on the staging row.
    `rt` needs mixed graphs and batch-1 prefill graphs of the chunk's length (prefill_chunk = interleave_chunk)."""
    import statistics

    shapes, cache, dev = rt.shapes, rt.cache, rt.device
    chunk = shapes.interleave_chunk
    ids, pos = torch.arange(batch, device=dev) + 11, torch.full((batch,), 200, device=dev)
    chunk_ids = torch.arange(chunk, device=dev)[None] + 5
    start, last = torch.tensor([128], device=dev), torch.tensor([chunk - 1], device=dev)
    row = [k[1:2] for k in cache.keys], [v[1:2] for v in cache.values]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def separate():
        rt.graphs.prefill(chunk_ids, start, last, *row, shapes.kv_len(128 + chunk))
        rt.graphs.decode(ids, pos, *cache.rows(batch), shapes.kv_len(201))

    def mixed():
        rt.graphs.mixed(ids, pos, *cache.rows(batch), chunk_ids, start, last, *cache.staging(),
                        shapes.kv_len(max(128 + chunk, 201)))

    steps = {"separate": separate, "mixed": mixed}
    times = {name: [] for name in steps}
    with torch.no_grad():
        for step in (separate, mixed, separate, mixed):
            step()
        for r in range(rounds):  # alternated, each first in every other round
            for name in sorted(steps, reverse=r % 2 == 1):
                sync()
                t = time.perf_counter()
                for _ in range(5):
                    steps[name]()
                sync()
                times[name].append((time.perf_counter() - t) / 5 * 1e3)
    out = {name: statistics.median(v) for name, v in times.items()}
    out["mixed_over_separate"] = out["mixed"] / out["separate"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    from gptoss.runtime import Runtime, Settings
    from gptoss.tools.make_checkpoint import make_checkpoint

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("tiny", "bench"):
            ckpt = make_checkpoint(Path(tmp) / preset, preset, layout="mxfp4")
            settings = Settings(device="cuda", dtype="bfloat16", max_batch_size=8, max_seq_len=256,
                                prefill_chunk=64, batch_sizes=(1, 4, 8), progress=False)
            t0 = time.perf_counter()
            eager = Runtime.from_pretrained(ckpt, settings.replace(backend="eager"))
            compiled = Runtime.from_pretrained(ckpt, settings.replace(backend="inductor", mixed_steps=True,
                                                                      artifacts=str(Path(tmp) / f"art-{preset}")))
            entry = {"compile_s": time.perf_counter() - t0}
            prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4], list(range(20, 60)), [99] * 7]
            for name, ps in (("batch1", prompts[:1]), ("batch4", prompts)):
                a, b = _tokens(eager, ps, 32), _tokens(compiled, ps, 32)
                entry[f"tokens_equal_{name}"] = a == b
                entry[f"first_divergence_{name}"] = [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), None)
                                                     for u, v in zip(a, b)]
            sequence = list(range(20, 68))
            prefixes = [sequence[:n] for n in range(3, 48, 3)]
            entry["max_abs_dlogits_16_prefixes"] = (eager.logits(prefixes) - compiled.logits(prefixes)).abs().max().item()
            for batch in (1, 8):
                entry[f"eager_decode_b{batch}_tok_s"] = _decode_rate(eager, batch)
                entry[f"compiled_cudagraph_decode_b{batch}_tok_s"] = _decode_rate(compiled, batch)
                entry[f"serving_step_b{batch}_ms"] = mixed_vs_separate(compiled, batch)
            report[preset] = entry
            print(preset, json.dumps(entry, indent=1), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cuda_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
