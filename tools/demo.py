"""`make demo`: load the small built-in checkpoint, stream a generation, report speed.

    python -m gptoss.tools.demo --model checkpoints/tiny [--backend eager|inductor] [--prompt TEXT]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from gptoss.graph import BACKENDS
from gptoss.runtime import Runtime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--backend", default="eager", choices=[b for b in BACKENDS if "cpu" in BACKENDS[b].devices])
    ap.add_argument("--prompt", default="The harbour at dawn was quiet, and the boats")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    rt = Runtime.from_pretrained(args.model, backend=args.backend, max_batch_size=4, max_seq_len=256,
                                 prefill_chunk=64)
    print(f"loaded {args.model} ({rt.config.num_hidden_layers} layers, {rt.config.num_local_experts} experts, "
          f"vocab {rt.config.vocab_size}) on {rt.device}, backend {rt.backend}, "
          f"{torch.get_num_threads()} threads, in {time.perf_counter() - t0:.1f}s")
    print("(the built-in checkpoints have random weights: the text is noise; the pipeline is the real one)")
    print(f"prompt: {args.prompt!r}\n--- streamed (greedy) ---")
    for event in rt.generate([args.prompt], max_new_tokens=args.max_new_tokens, stream=True):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    s = rt.last_stats
    print(f"\n--- {s.generated_tokens} tokens; prefill {s.prompt_tokens} tokens in {s.prefill_s * 1e3:.1f} ms; "
          f"decode {s.decode_tokens_per_s:.1f} tokens/s ---")

    prompts = [args.prompt, "Once upon a time", "A list of colours: red,"]
    t0 = time.perf_counter()
    results = rt.generate(prompts, max_new_tokens=24, temperature=0.8, top_p=0.95, seed=0)
    dt = time.perf_counter() - t0
    print(f"--- batch of {len(prompts)} (sampled, seed 0): {sum(len(r.token_ids) for r in results) / dt:.1f} "
          f"tokens/s overall ---")
    for p, r in zip(prompts, results):
        print(f"{p!r} -> {r.text!r} [{r.finish_reason}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
