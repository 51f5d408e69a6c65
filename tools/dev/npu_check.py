"""The decisive device check, first thing to run on an Ascend machine (one A2 device, under 10 minutes): what the
CPU emulator in tests/ can only assume, measured on the kernels themselves.

1. The attention GE graph built with tiling sink on (expected to fail: FIA in TND refuses tiling_schedule_optimize)
   and off (expected to work and match the torch reference).
2. The sliding-window edge: the band built with pre_tokens = W - 1 matches GPT-OSS's window W; with pre_tokens = W
   (the recipe's and vllm-ascend's value) it must differ (one key too many).
3. Band mode in TND decode (one query per row, rows on both sides of the window and page edges).
4. Every op of the `npu` op table vs the torch op table at the model's shapes (bf16: TND attention is bf16-only).
5. A short greedy generation: eager npu op table vs torchair GE graphs.

    python -m gptoss.tools.dev.npu_check                         # gpt-oss-20b shapes (1 device), then a generation on a
                                                      # random bench-size checkpoint
    python -m gptoss.tools.dev.npu_check --model /path/gpt-oss-20b --max-new-tokens 32
    python -m gptoss.tools.dev.npu_check --tp 8 --skip-generate  # per-rank shapes of gpt-oss-120b at TP 8 (one device)

Each op line prints the largest |error| of the npu op and of the torch op (same dtype, same device) against a float32
torch reference, and both timings. An op passes when its error is within max(2 x the torch op's error, a floor).
The last screen is the verdict, one line per check; exit status 1 if anything fails or an expectation is not met.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

# gpt-oss-20b: hidden 2880, 64 query / 8 kv heads of 64, 32 experts top-4, intermediate 2880, window 128.
# gpt-oss-120b differs in depth (36 layers) and experts (128); per-layer shapes at --tp are what matter here.
SHAPES_20B = dict(hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                  num_experts_per_tok=4, intermediate_size=2880, sliding_window=128, rms_norm_eps=1e-5,
                  swiglu_alpha=1.702, swiglu_limit=7.0)
SHAPES_120B = dict(SHAPES_20B, num_local_experts=128)


@dataclass
class Result:
    name: str
    shape: str
    err_npu: float
    err_torch: float
    ms_npu: float
    ms_torch: float
    ok: bool
    note: str = ""


def _sync(device: torch.device) -> None:
    mod = getattr(torch, device.type, None)
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


def _time(fn, device, iters: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters * 1e3


def _err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(_err(x, y) for x, y in zip(a, b))
    return float((a.float() - b.float()).abs().max())


class Checker:
    def __init__(self, device, dtype, iters: int, floor: float):
        from gptoss.model.ops import get_ops, torch_ops
        self.npu, self.ge, self.ref = get_ops("npu"), get_ops("npu", mode="ge"), torch_ops
        self.device, self.dtype, self.iters, self.floor = device, dtype, iters, floor
        self.results: list[Result] = []

    def randn(self, *shape, scale=1.0):
        return (torch.randn(*shape, device=self.device) * scale).to(self.dtype)

    def compare(self, name, shape, npu_fn, torch_fn, ref_fn, floor=None, note="", expect_match=True):
        """npu_fn/torch_fn: the two op tables at the working dtype; ref_fn: torch ops in float32. With
        expect_match=False the check passes when the npu result differs (beyond the tolerance) from the reference."""
        got, base, ref = npu_fn(), torch_fn(), ref_fn()
        e_npu, e_torch = _err(got, ref), _err(base, ref)
        match = e_npu <= max(2 * e_torch, self.floor if floor is None else floor) and bool(
            torch.isfinite(torch.as_tensor(e_npu)))
        ok = match if expect_match else bool(torch.isfinite(torch.as_tensor(e_npu))) and not match
        res = Result(name, shape, e_npu, e_torch, _time(npu_fn, self.device, self.iters),
                     _time(torch_fn, self.device, self.iters), ok, note)
        self.results.append(res)
        print(f"{res.name:<34} {res.shape:<28} {res.err_npu:>11.3e} {res.err_torch:>12.3e} {res.ms_npu:>9.3f} "
              f"{res.ms_torch:>9.3f}  {'PASS' if ok else 'FAIL'} {note}", flush=True)
        return res

    # -- the ops ---------------------------------------------------------------------------------------------------
    def norms(self, tokens, hidden, eps):
        x, r, w = self.randn(tokens, hidden), self.randn(tokens, hidden), 1 + self.randn(hidden, scale=0.1)
        f = lambda t: t.float()  # noqa: E731
        self.compare("rms_norm / npu_rms_norm", f"[{tokens}, {hidden}]", lambda: self.npu.rms_norm(x, w, eps),
                     lambda: self.ref.rms_norm(x, w, eps), lambda: self.ref.rms_norm(f(x), f(w), eps))
        self.compare("add_rms_norm / npu_add_rms_norm", f"[{tokens}, {hidden}]",
                     lambda: self.npu.add_rms_norm(x, r, w, eps), lambda: self.ref.add_rms_norm(x, r, w, eps),
                     lambda: self.ref.add_rms_norm(f(x), f(r), f(w), eps))

    def cache_write(self, batch, slots, kv_heads, dim, steps):
        new = self.randn(batch, steps, kv_heads, dim)
        start = torch.randint(0, slots - steps + 1, (batch,), device=self.device)
        a = torch.zeros(batch, slots, kv_heads, dim, device=self.device, dtype=self.dtype)
        b = a.clone()

        def run_npu():
            self.npu.cache_write(a, start, new)
            return a

        def run_ref():
            self.ref.cache_write(b, start, new)
            return b
        self.compare("cache_write / scatter_update_", f"[{batch}, {slots}, {kv_heads}, {dim}] t={steps}",
                     run_npu, run_ref, run_ref, floor=0.0, note="(exact)")

    def attention(self, label, batch, steps, q_heads, kv_heads, dim, slots, kv_len, starts, window):
        kc, vc = self.randn(batch, slots, kv_heads, dim), self.randn(batch, slots, kv_heads, dim)
        q, sinks = self.randn(batch, steps, q_heads, dim), self.randn(q_heads)
        q_pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(steps, device=self.device)
        scale = dim ** -0.5
        f = lambda t: t.float()  # noqa: E731
        self.compare(f"attention {label}", f"b={batch} t={steps} kv={kv_len} w={window}",
                     lambda: self.npu.attention(q, kc, vc, sinks, q_pos, window, scale, kv_len),
                     lambda: self.ref.attention(q, kc, vc, sinks, q_pos, window, scale, kv_len),
                     lambda: self.ref.attention(f(q), f(kc), f(vc), f(sinks), q_pos, window, scale, kv_len))
        return q, kc, vc, sinks, q_pos, scale

    def band_edge(self, batch_starts, q_heads, kv_heads, dim, slots, window):
        """pre_tokens = W - 1 (the op table for window W) must match GPT-OSS's window W; pre_tokens = W (the op
        table asked for window W + 1) must not: the kernel's band is inclusive."""
        batch = len(batch_starts)
        kc, vc = self.randn(batch, slots, kv_heads, dim), self.randn(batch, slots, kv_heads, dim)
        for row, pos in enumerate(batch_starts):  # a loud value just outside the window: visible only if the band
            vc[row, pos - window] = 10.0          # keeps one key too many (its weight ~1/W moves the output ~10/W)
        q, sinks = self.randn(batch, 1, q_heads, dim), self.randn(q_heads)
        q_pos = torch.tensor(batch_starts, device=self.device)[:, None]
        scale, f = dim ** -0.5, (lambda t: t.float())  # noqa: E731
        ref = lambda: self.ref.attention(f(q), f(kc), f(vc), f(sinks), q_pos, window, scale, slots)  # noqa: E731
        base = lambda: self.ref.attention(q, kc, vc, sinks, q_pos, window, scale, slots)  # noqa: E731
        self.compare(f"band pre_tokens=W-1={window - 1}", f"decode b={len(batch_starts)} w={window}",
                     lambda: self.npu.attention(q, kc, vc, sinks, q_pos, window, scale, slots), base, ref,
                     note="(expect: match)")
        self.compare(f"band pre_tokens=W={window}", f"decode b={len(batch_starts)} w={window}",
                     lambda: self.npu.attention(q, kc, vc, sinks, q_pos, window + 1, scale, slots), base, ref,
                     note="(expect: differ, one key too many)", expect_match=False)

    def attention_graph(self, q, kc, vc, sinks, q_pos, window, scale, kv_len, tiling_sink: bool):
        """The GE path: attention inside a torchair max-autotune graph, lengths as tensors; with tiling sink on the
        build is expected to fail ("When layout is TND/NTD_TND, not support tiling_schedule_optimize = True")."""
        from gptoss.graph.torchair import compiler_config
        from gptoss.model.ops import npu_ops
        torchair = npu_ops._torchair()
        config = compiler_config(torchair, "max-autotune")
        config.experimental_config.tiling_schedule_optimize = tiling_sink
        backend = torchair.get_npu_backend(compiler_config=config)
        torch._dynamo.reset()
        fn = torch.compile(lambda *a: self.ge.attention(*a, window, scale, kv_len), backend=backend,
                           fullgraph=True, dynamic=False)
        f = lambda t: t.float()  # noqa: E731
        name = f"attention GE graph, tiling sink {'on' if tiling_sink else 'off'}"
        shape = f"b={q.shape[0]} t={q.shape[1]} w={window}"
        if tiling_sink:
            try:
                out = fn(q, kc, vc, sinks, q_pos)
                _sync(self.device)
            except Exception as e:  # the documented refusal (tiling or compile error surfaces here)
                seen = "tiling_schedule_optimize" in str(e)
                res = Result(name, shape, float("nan"), float("nan"), 0.0, 0.0, True,
                             "(refused as documented)" if seen else f"(refused: {str(e).splitlines()[0][:60]})")
            else:
                res = Result(name, shape, _err(out, q.new_zeros(1)), float("nan"), 0.0, 0.0, False,
                             "(UNEXPECTED: built and ran; the TND limit did not apply)")
            self.results.append(res)
            print(f"{res.name:<34} {res.shape:<28} {'':>11} {'':>12} {'':>9} {'':>9}  "
                  f"{'PASS' if res.ok else 'FAIL'} {res.note}", flush=True)
            return res
        return self.compare(name, shape, lambda: fn(q, kc, vc, sinks, q_pos),
                            lambda: self.ref.attention(q, kc, vc, sinks, q_pos, window, scale, kv_len),
                            lambda: self.ref.attention(f(q), f(kc), f(vc), f(sinks), q_pos, window, scale, kv_len))

    def moe(self, tokens, hidden, inter, experts, top_k, alpha, limit):
        x = self.randn(tokens, hidden)
        rw, rb = self.randn(experts, hidden, scale=hidden ** -0.5), self.randn(experts, scale=0.1)
        w_ref, i_ref = self.ref.route(x.float(), rw.float(), rb.float(), top_k)
        w_npu, i_npu = self.npu.route(x, rw, rb, top_k)
        same = float((i_npu.long().sort(-1).values == i_ref.sort(-1).values).all(-1).float().mean())
        self.compare("route / gating_top_k_softmax", f"[{tokens}, {experts}] k={top_k}",
                     lambda: self.npu.route(x, rw, rb, top_k)[0], lambda: self.ref.route(x, rw, rb, top_k)[0],
                     lambda: w_ref, note=f"(same experts for {same:.1%} of tokens)")
        gu, gu_b = self.randn(experts, hidden, 2 * inter, scale=2 * hidden ** -0.5), self.randn(experts, 2 * inter,
                                                                                               scale=0.1)
        dn, dn_b = self.randn(experts, inter, hidden, scale=0.5 * inter ** -0.5), self.randn(experts, hidden, scale=0.1)
        weights, idx = w_ref.to(self.dtype), i_ref  # the same routing for all three
        f = lambda t: t.float()  # noqa: E731
        self.compare("moe / init_routing..finalize", f"N={tokens} E={experts} I={inter}",
                     lambda: self.npu.moe(x, weights, idx, gu, gu_b, dn, dn_b, alpha, limit),
                     lambda: self.ref.moe(x, weights, idx, gu, gu_b, dn, dn_b, alpha, limit),
                     lambda: self.ref.moe(f(x), w_ref, i_ref, f(gu), f(gu_b), f(dn), f(dn_b), alpha, limit))
        npu = sys.modules["torch_npu"]
        if hasattr(npu, "npu_clipped_swiglu"):
            h = self.randn(tokens * top_k, 2 * inter, scale=4.0)
            self.compare("npu_clipped_swiglu", f"[{tokens * top_k}, {2 * inter}]",
                         lambda: npu.npu_clipped_swiglu(h, dim=-1, alpha=alpha, limit=limit, bias=1.0,
                                                        interleaved=True),
                         lambda: self.ref.clamped_swiglu(h, alpha, limit),
                         lambda: self.ref.clamped_swiglu(h.float(), alpha, limit))


def run_op_checks(args, device, dtype) -> list[Result]:
    shapes = dict(SHAPES_120B if args.experts == 128 else SHAPES_20B)
    if args.model:
        from gptoss.model.config import GptOssConfig
        cfg = GptOssConfig.from_pretrained(args.model)
        shapes = {k: getattr(cfg, k) for k in shapes}
    tp = args.tp
    q_heads = shapes["num_attention_heads"] // tp
    kv_heads = max(shapes["num_key_value_heads"] // tp, 1)
    inter = shapes["intermediate_size"] // tp
    hidden, dim, window = shapes["hidden_size"], shapes["head_dim"], shapes["sliding_window"]
    print(f"per-rank shapes at TP {tp}: hidden {hidden}, heads {q_heads}/{kv_heads} x {dim}, experts "
          f"{shapes['num_local_experts']} top-{shapes['num_experts_per_tok']}, intermediate {inter}, window {window}")
    print(f"{'op':<34} {'shape':<28} {'max|npu-ref|':>11} {'max|torch-ref|':>12} {'npu ms':>9} {'torch ms':>9}")
    c = Checker(device, dtype, args.iters, args.floor)
    slots, chunk = args.slots, args.chunk
    c.norms(chunk, hidden, shapes["rms_norm_eps"])
    c.cache_write(4, slots, kv_heads, dim, chunk)
    # prefill chunks: rows at different starts so the band edge and the page edges fall inside chunks; decode rows
    # on both sides of the window edge, a page edge and the end of the cache
    starts = [0, max(0, window - chunk // 2), slots // 2 - chunk // 3, slots - chunk]  # positions >= 0
    decode = sorted({0, window - 2, window - 1, window, window + 1, 127, 128, 129, slots // 2, slots - 1})
    for w, kind in ((window, "sliding"), (0, "full")):
        c.attention(f"{kind} prefill", len(starts), chunk, q_heads, kv_heads, dim, slots, slots, starts, w)
        c.attention(f"{kind} decode", len(decode), 1, q_heads, kv_heads, dim, slots, slots, decode, w)
        short = [p for p in decode if p < 256]
        c.attention(f"{kind} decode kv_len 256", len(short), 1, q_heads, kv_heads, dim, slots, 256, short, w)
    c.band_edge([p for p in decode if p >= window] or [window], q_heads, kv_heads, dim, slots, window)
    # a sliding layer's ring cache (graph/shapes.py sizes it for this chunk): rows far past its end, so their
    # block tables list the pages in wrapped order; the torch table reads the same ring by slot positions
    from gptoss.graph import ShapePlan
    ring = ShapePlan(1, 1 << 20, chunk, slot_multiple=128, window=window).window_slots
    ring_starts = [3 * ring, 5 * ring + chunk, 7 * ring + ring - chunk]  # chunk-aligned, as the runtime writes
    ring_decode = [3 * ring + 1, 4 * ring - 1, 5 * ring + window, 6 * ring + 127, 6 * ring + 128]
    c.attention("sliding ring prefill", len(ring_starts), chunk, q_heads, kv_heads, dim, ring, 8 * ring,
                ring_starts, window)
    c.attention("sliding ring decode", len(ring_decode), 1, q_heads, kv_heads, dim, ring, 8 * ring, ring_decode,
                window)
    if not args.skip_graph:
        args_ = c.attention("sliding prefill (for graph)", len(starts), chunk, q_heads, kv_heads, dim, slots, slots,
                            starts, window)
        for tiling_sink in (True, False):
            c.attention_graph(*args_[:5], window, args_[5], slots, tiling_sink)
    for tokens in (chunk, 8):
        c.moe(tokens, hidden, inter, shapes["num_local_experts"], shapes["num_experts_per_tok"],
              shapes["swiglu_alpha"], shapes["swiglu_limit"])
    return c.results


def run_generation(args, device, dtype) -> bool:
    """Greedy tokens from the eager npu op table vs the torchair graphs of the same model."""
    from gptoss.model.loader import load_model
    from gptoss.runtime import Runtime
    model_dir = args.model
    if model_dir is None:
        from gptoss.tools.make_checkpoint import make_checkpoint
        model_dir = make_checkpoint(tempfile.mkdtemp(prefix="npu_check_"), "bench", layout="bf16")
        print(f"random bench checkpoint (gpt-oss-20b proportions) in {model_dir}")
    kw = dict(max_batch_size=2, max_seq_len=args.gen_seq_len, prefill_chunk=args.chunk)
    tokens = {}
    for backend, ops_mode in (("eager", "eager"), ("torchair", "ge")):  # GE graphs trace the table's "ge" mode
        model = load_model(model_dir, dtype=dtype, device=device, ops="npu", ops_mode=ops_mode)
        torch.manual_seed(0)
        prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (37, 150)]
        t0 = time.perf_counter()
        extra = dict(artifacts=tempfile.mkdtemp(prefix="npu_check_air_")) if backend == "torchair" else {}
        rt = Runtime(model, model_dir, backend=backend, **kw, **extra)
        ready = time.perf_counter() - t0
        out = rt.generate(prompts, max_new_tokens=args.max_new_tokens)
        s = rt.last_stats
        tokens[backend] = [r.token_ids for r in out]
        print(f"{backend:>9}: ready in {ready:.1f}s, {s.generated_tokens} tokens, decode {s.decode_tokens_per_s:.1f} "
              f"tokens/s; first tokens {[t[:8] for t in tokens[backend]]}", flush=True)
        del rt, model
    same = tokens["eager"] == tokens["torchair"]
    print(f"generation eager vs torchair: {'identical' if same else 'DIFFERENT'} greedy tokens")
    return same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (shapes from its config; generation on it)")
    ap.add_argument("--device", default="npu:0")
    ap.add_argument("--tp", type=int, default=1, help="check per-rank shapes of this tensor-parallel size")
    ap.add_argument("--experts", type=int, default=32, choices=[32, 128], help="20b (32) or 120b (128) shapes")
    ap.add_argument("--slots", type=int, default=2048, help="KV cache slots (multiple of 128)")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk")
    ap.add_argument("--iters", type=int, default=20, help="timing iterations per op")
    ap.add_argument("--floor", type=float, default=2e-2, help="error always accepted (bf16 rounding)")
    ap.add_argument("--skip-graph", action="store_true", help="skip the torchair graph checks")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--gen-seq-len", type=int, default=512)
    args = ap.parse_args(argv)

    from gptoss.graph.torchair import configure_launch_env
    from gptoss.model.ops import npu_ops  # imports torch_npu, or says what to install
    configure_launch_env()
    torch_npu = npu_ops._npu()
    device = torch.device(args.device)
    if device.type == "npu":
        torch.npu.set_device(device)
    dtype = torch.bfloat16  # FIA in TND (learnable_sink) is bf16-only; the npu op table refuses anything else
    cann = "unknown"
    try:
        cann = torch_npu.npu.utils.get_cann_version(module="CANN")
    except Exception:
        pass
    print(f"torch {torch.__version__}, torch_npu {getattr(torch_npu, '__version__', '?')}, CANN {cann}, "
          f"device {device}, dtype bfloat16")
    torch.manual_seed(0)
    results = run_op_checks(args, device, dtype)
    generated = None
    if not args.skip_generate and not args.skip_graph:
        generated = run_generation(args, device, dtype)
    print_verdict(results, generated)
    ok = all(r.ok for r in results) and generated is not False
    failed = [r.name for r in results if not r.ok] + (["generation"] if generated is False else [])
    print("ALL PASS" if ok else f"FAILED: {failed}")
    return 0 if ok else 1


def print_verdict(results: list[Result], generated: bool | None) -> None:
    """One screen: what each check established."""
    print("\n==== verdict " + "=" * 60)
    for r in results:
        print(f"  {'PASS' if r.ok else 'FAIL'}  {r.name:<34} {r.shape:<28} {r.note}")
    if generated is not None:
        print(f"  {'PASS' if generated else 'FAIL'}  generation eager vs torchair GE graphs (identical greedy tokens)")


if __name__ == "__main__":
    sys.exit(main())
