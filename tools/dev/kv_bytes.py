"""KV-cache bytes a runtime allocates, with sliding layers on rings (window_cache="ring") and on full-length caches
("full"), at the published gpt-oss shapes: the runtime's own shape plan and KVCache allocation, on the meta device
(sizes only, nothing allocated).

    python -m gptoss.tools.dev.kv_bytes [--seq-lens 8192,32768,131072] [--batch 1] [--dtype bfloat16] [--backend eager]
"""
from __future__ import annotations

import argparse

import torch

from gptoss.model.config import GptOssConfig
from gptoss.model.parallel import Parallel, ShardPlan
from gptoss.runtime.runtime import allocate_cache, plan_shapes
from gptoss.runtime.settings import DEFAULTS, DTYPES, Settings

# The attention shapes of the published checkpoints (config.json of openai/gpt-oss-20b and -120b): what the cache
# depends on. The experts do not matter here.
MODELS = {
    "gpt-oss-20b": dict(num_hidden_layers=24, num_local_experts=32),
    "gpt-oss-120b": dict(num_hidden_layers=36, num_local_experts=128),
}
COMMON = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
              num_key_value_heads=8, head_dim=64, num_experts_per_tok=4, sliding_window=128,
              max_position_embeddings=131072, model_type="gpt_oss")


def model_config(name: str) -> GptOssConfig:
    raw = dict(COMMON, **MODELS[name])
    raw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                          for i in range(raw["num_hidden_layers"])]
    return GptOssConfig.from_dict(raw, name)


def kv_bytes(config: GptOssConfig, settings: Settings, tp_size: int = 1) -> tuple[int, int | None]:
    """(bytes per rank, the sliding layers' slots or None) of the cache a runtime with `settings` allocates."""
    # the defaults Settings.resolve fills in, without resolving a device (torch has no "npu" without torch_npu)
    settings = settings.replace(**{k: v for k, v in DEFAULTS.items() if getattr(settings, k) is None})
    # (resolved per backend; the cache's size depends on neither)
    settings = settings.replace(min_prefill_chunk=settings.min_prefill_chunk or 16,
                                prefill_granule=settings.prefill_granule or 0)
    shapes = plan_shapes(config, settings)
    cache = allocate_cache(config, ShardPlan.build(config, Parallel(tp_size, 0)), shapes, settings.torch_dtype, "meta")
    return cache.nbytes, shapes.window_slots


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="8192,32768,131072")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--backend", default="eager", help="eager/inductor: torch table; torchair: 128-slot pages")
    args = ap.parse_args(argv)
    print(f"KV cache per sequence row x {args.batch}, {args.dtype}, backend {args.backend} (runtime allocation on the "
          f"meta device)")
    print(f"{'model':<14}{'max_seq_len':>12}{'full (GiB)':>12}{'ring (GiB)':>12}{'ring/full':>11}{'ring slots':>12}")
    for name in MODELS:
        config = model_config(name)
        for seq in (int(s) for s in args.seq_lens.split(",")):
            base = Settings(backend=args.backend, max_batch_size=args.batch, max_seq_len=seq, dtype=args.dtype)
            full, _ = kv_bytes(config, base.replace(window_cache="full"))
            ring, slots = kv_bytes(config, base.replace(window_cache="ring"))
            print(f"{name:<14}{seq:>12}{full / 2**30:>12.3f}{ring / 2**30:>12.3f}{ring / full:>11.3f}"
                  f"{slots or '-':>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
