"""CPU kernels for weights kept as published, as torch custom ops (`torch.ops.gptoss.*`):

    mxfp4_grouped_mm(x [N, K] f32, blocks [E, M, K/32, 16] u8, scales [E, M, K/32] u8, offs [E] i32, bias [E, M]?)
    bf16_grouped_mm(x [N, K] f32, weight [E, M, K] bf16, offs [E] i32, bias [E, M]?)
    bf16_linear(x [N, K] f32, weight [M, K] bf16, bias [M]?)                       -> [N, M] f32, = x W^T + b
    mxfp4_moe(x [N, H] f32, weights [N, k] f32, experts [N, k] int, gate_up blocks/scales/bias,
              down blocks/scales/bias, down_pad, alpha, limit)                       -> [N, H] f32
        one MoE layer's routed experts (sort, gather, gate_up, clamped SwiGLU, down, weighted sum) in one call
    mxfp4_moe_routed(x [N, H] f32, router_weight [E, H] bf16, router_bias [E]?, top_k, then as mxfp4_moe)
                                                                                     -> [N, H] f32
        the same with the router in the call (bf16_linear's logits, top k, softmax over those k)
    decode_attention(q [B, T, Hq, D] f32, k_cache, v_cache [B, S, Hkv, D] f32, sinks [Hq], k_pos [B, n] int,
                     q_pos [B, T] int, window, scale)                                  -> [B, T, Hq, D] f32
        attention with sink logits over the visible cache slots (model/ops/torch_ops.attention's semantics) for
        single-token steps (each query row on its own)
    prefill_attention(the same arguments)                                             -> [B, T, Hq, D] f32
        the same semantics for chunks of several tokens (tiles of query rows against blocks of keys)
    rms_norm(x [..., H] f32, weight [H] f32, eps)                                      -> like x
    add_rms_norm(x, residual [..., H] f32, weight [H] f32, eps)     -> (rms_norm(x + residual), x + residual)
    rope(x [B, T, H, D] f32, cos [B, T, D/2], sin [B, T, D/2])                         -> [B, T, H, D] f32
    cache_write(cache [B, S, H, D] f32, start [B] int, values [B, T, H, D] f32)        -> None, in place
        the small per-layer ops of an eager step, one call each (model/ops/torch_ops: the same semantics)

Rows of x are sorted by expert; `offs[e]` is the cumulative end of expert e's rows. The ops (schemas and shape-only
fake implementations) are registered when this module is imported, which importing `gptoss.model` does, so graphs
capture them as opaque nodes and saved graphs find them in a new process. The C++ kernels become the ops' CPU
implementations when the library loads (on the first call of an op or of `extension()`). The C++ (csrc/) is compiled
on first use through torch's extension builder and cached under a name keyed by the sources' hash, so an edit
rebuilds it and an unchanged source loads the cached library. The instruction set (AMX, AVX-512, AVX2, portable)
is chosen at run time ("amx" is AVX-512 with prefill's matrix products on AMX tiles); `GPTOSS_CPU_ISA=avx512` (or
avx2, scalar) or `set_isa` forces a lower one. Off AMX, prefill's fp32 products run on MKL's sgemm on Intel CPUs
and on the AVX-512 or AVX2 path's own elsewhere, where MKL takes its AVX2 code (on a Zen 3 its copies of each
decoded tile into its own layout took 13.6% of a prompt chunk) (`GPTOSS_SGEMM=own|mkl` or `set_sgemm`).

How far ahead the gemvs prefetch weights is measured, not assumed: machines differ by 2x on it (a Xeon VM wanted
8 KiB on both gemvs, a Zen 4 VM none on bf16 and 2-4 KiB on MXFP4). When the library loads, `tune_prefetch` times
each candidate distance on the gemvs that read one on this instruction set (both on AVX-512, MXFP4 on AVX2) with
weights streamed from memory (~0.2 s) and keeps the fastest.
`GPTOSS_PREFETCH="mxfp4=N,bf16=N"` sets the distances instead, `GPTOSS_PREFETCH=default` keeps the instruction
set's starting values.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

__all__ = ["extension", "build_library", "isa", "available_isas", "set_isa", "fma_rates", "sgemm", "set_sgemm",
           "prefetch", "set_prefetch", "tune_prefetch", "mxfp4_grouped_mm", "bf16_grouped_mm", "bf16_linear",
           "mxfp4_moe", "mxfp4_moe_routed", "decode_attention", "prefill_attention", "rms_norm", "add_rms_norm",
           "rope", "cache_write"]

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(sorted(CSRC.glob("*.cpp")))  # compiled; the headers beside them count in the hash too
_lock = threading.Lock()
_module = None


def source_hash() -> str:
    """The sources' and this torch's (version and place: another virtualenv's headers are other compile flags)."""
    h = hashlib.sha256(f"{torch.__version__} {Path(torch.__file__).parent}".encode())
    for path in sorted(CSRC.glob("*.[ch]*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def extension():
    """The compiled kernels (built on first call, then loaded from torch's extension cache)."""
    global _module
    if _module is None:
        with _lock:
            if _module is None:
                module = build_library(f"gptoss_cpu_kernels_{source_hash()}", SOURCES)
                _prefetch_from_env(module)
                module.register_cpu_impls()
                _module = module
    return _module


def build_library(name: str, sources, python_module: bool = True):
    """Compiles `sources` as extension `name` through torch's builder, or loads the build cached under that name.

    torch's builder marks a build in progress with a file its other callers wait on forever; a process killed
    mid-build leaves it behind, and every later process would hang on it. So builds here are serialised by an
    advisory lock the OS drops when its holder dies: whoever holds it knows any marker left in the directory is
    stale and removes it.

    The sources are compiled from a copy in the build directory (with the headers beside them): ninja rebuilds
    whenever a compile command changes, and the commands name the sources' paths, so a second checkout of the
    same sources would otherwise rebuild the library (minutes on 2 cores) each time the other one had.
    """
    import fcntl

    from torch.utils import cpp_extension
    _ninja_on_path()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    directory = Path(root) / "gptoss" / name
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        if not (directory / f"{name}.so").exists():
            print(f"compiling {name} once for this machine (minutes on 2 cores; cached in {directory})",
                  file=sys.stderr, flush=True)
        copies = _copied_sources(sources, directory / "src")
        # -fopenmp: at::parallel_for runs on torch's OpenMP pool (the same libgomp, already loaded).
        return cpp_extension.load(name=name, sources=[str(p) for p in copies], build_directory=str(directory),
                                  extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                  is_python_module=python_module)


def _copied_sources(sources, into: Path) -> list[Path]:
    """`sources` and the headers beside them copied into `into`; a file already there with the same bytes is left
    alone (a fresh copy would be newer than its object file, which ninja would rebuild)."""
    into.mkdir(exist_ok=True)
    sources = [Path(p) for p in sources]
    for path in {*sources, *(h for d in {p.parent for p in sources} for h in d.glob("*.h"))}:
        copy = into / path.name
        if not copy.is_file() or copy.read_bytes() != path.read_bytes():
            shutil.copyfile(path, copy)
    return [into / p.name for p in sources]


PREFETCH_CANDIDATES = (0, 1024, 2048, 4096, 8192)  # bytes ahead


def _prefetch_from_env(module) -> None:
    spec = os.environ.get("GPTOSS_PREFETCH", "").strip()
    if spec == "default":
        return
    if not spec:
        tune_prefetch(module=module)
        return
    values = dict(zip(("mxfp4", "bf16"), module.prefetch()))
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in values or not value.strip().isdigit():
            raise ValueError(f"GPTOSS_PREFETCH={spec!r}: expected 'mxfp4=BYTES,bf16=BYTES' or 'default'")
        values[name.strip()] = int(value)
    module.set_prefetch(values["mxfp4"], values["bf16"])


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` package (a dependency) installs it next to the venv's
    Python, which is not on PATH when that Python is run by its full path."""
    if shutil.which("ninja") is None:
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def isa() -> str:
    """The instruction set the kernels use now: 'amx', 'avx512', 'avx2' or 'scalar'."""
    return extension().isa()


def available_isas() -> list[str]:
    """The instruction sets this CPU runs, best first."""
    return list(extension().available_isas())


def fma_rates() -> dict[str, float]:
    """fp32 multiply-adds one core completes per ns at each vector width this CPU runs, e.g. {"avx2": 58.3,
    "avx512": 58.4} (empty off x86; ~20 ms): the ceiling of the kernels' arithmetic, for benchmark reports. Where
    the two are equal, 512-bit operations run at half the 256-bit rate."""
    return dict(extension().fma_rates())


def set_isa(name: str) -> None:
    """Use `name` (one of available_isas(), or 'best') from now on in this process. The prefetch distances go back
    to that instruction set's starting values (`tune_prefetch` measures them again)."""
    extension().set_isa(name)


def sgemm() -> str:
    """The fp32 product of the many-rows path (prefill) off AMX tiles now: 'own' (the instruction set's AVX-512
    kernel) or 'mkl' (torch's sgemm)."""
    return extension().sgemm()


def set_sgemm(name: str) -> None:
    """'own', 'mkl' or 'auto' (the default: own where the CPU is not Intel's, whose MKL runs its AVX2 code there;
    the AVX-512 and AVX2 paths have their own, the portable one none). `GPTOSS_SGEMM` sets it at load."""
    extension().set_sgemm(name)


def prefetch() -> dict[str, int]:
    """The gemvs' prefetch distances in bytes now: {"mxfp4": n, "bf16": n}."""
    return dict(zip(("mxfp4", "bf16"), extension().prefetch()))


def set_prefetch(mxfp4: int | None = None, bf16: int | None = None) -> None:
    now = prefetch()
    extension().set_prefetch(now["mxfp4"] if mxfp4 is None else mxfp4, now["bf16"] if bf16 is None else bf16)


def tune_prefetch(candidates=PREFETCH_CANDIDATES, footprint_mb: int = 64, rounds: int = 3, module=None) -> dict:
    """Time one batch-1 gemv over `footprint_mb` of weights (more than a last-level cache holds, so they stream
    from memory, as in a decode step) at each candidate distance, for the MXFP4 and the bf16 kernel; set the
    fastest of each. Rounds alternate the candidates, and each keeps its best round, so a burst of noise from
    elsewhere on the machine cannot pick the winner. Only the kernels whose loops read a distance on this
    instruction set are timed (AVX2's bf16 tiles ask for the next tile instead; the portable path never
    prefetches). Returns {kernel: {distance: GB/s}}."""
    import time

    module = module or extension()
    k = 4096
    bf16_rows, mxfp4_rows = footprint_mb * 2**20 // (2 * k), footprint_mb * 2**20 // (k // 2)
    x = torch.ones(1, k)
    bf16_w = torch.full((bf16_rows, k), 0.5, dtype=torch.bfloat16)  # filled: untouched pages would all be one
    blocks = torch.full((1, mxfp4_rows, k // 32, 16), 0x35, dtype=torch.uint8)
    scales = torch.full((1, mxfp4_rows, k // 32), 127, dtype=torch.uint8)
    offs = torch.ones(1, dtype=torch.int32)
    calls = {"mxfp4": (lambda: module.mxfp4_grouped_mm(x, blocks, scales, offs, None), blocks.numel()),
             "bf16": (lambda: module.bf16_linear(x, bf16_w, None), bf16_w.numel() * 2)}
    calls = {name: call for name, call in calls.items() if name in module.prefetched()}
    best = {name: {c: float("inf") for c in candidates} for name in calls}
    start = dict(zip(("mxfp4", "bf16"), module.prefetch()))
    for name, (call, _) in calls.items():
        call()  # warm: threads up, code paged in
        for _ in range(rounds):
            for c in candidates:
                module.set_prefetch(c if name == "mxfp4" else start["mxfp4"], c if name == "bf16" else start["bf16"])
                t0 = time.perf_counter()
                call()
                best[name][c] = min(best[name][c], time.perf_counter() - t0)
        module.set_prefetch(start["mxfp4"], start["bf16"])
    chosen = {**start, **{name: min(best[name], key=best[name].get) for name in calls}}
    module.set_prefetch(chosen["mxfp4"], chosen["bf16"])
    return {name: {c: calls[name][1] / t / 1e9 for c, t in best[name].items()} for name in calls}


_lib = torch.library.Library("gptoss", "FRAGMENT")
_lib.define("mxfp4_grouped_mm(Tensor x, Tensor blocks, Tensor scales, Tensor offs, Tensor? bias=None) -> Tensor")
_lib.define("bf16_grouped_mm(Tensor x, Tensor weight, Tensor offs, Tensor? bias=None) -> Tensor")
_lib.define("bf16_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor")
_lib.define("mxfp4_moe(Tensor x, Tensor weights, Tensor experts, Tensor gate_up_blocks, Tensor gate_up_scales, "
            "Tensor gate_up_bias, Tensor down_blocks, Tensor down_scales, Tensor down_bias, int down_pad, "
            "float alpha, float limit) -> Tensor")
_lib.define("mxfp4_moe_routed(Tensor x, Tensor router_weight, Tensor? router_bias, int top_k, "
            "Tensor gate_up_blocks, Tensor gate_up_scales, Tensor gate_up_bias, Tensor down_blocks, "
            "Tensor down_scales, Tensor down_bias, int down_pad, float alpha, float limit) -> Tensor")
for _name in ("decode_attention", "prefill_attention"):
    _lib.define(f"{_name}(Tensor q, Tensor k_cache, Tensor v_cache, Tensor sinks, Tensor k_pos, Tensor q_pos, "
                "int window, float scale) -> Tensor")
_lib.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_lib.define("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)")
_lib.define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor")
_lib.define("cache_write(Tensor(a!) cache, Tensor start, Tensor values) -> ()")
# Until the library is loaded, each op's implementation is this Python one: it loads the library, whose loading
# registers the C++ kernels as the ops' CPU implementations (they take precedence over these from then on), and
# passes the call on. Registered for every backend rather than CPU so that nothing is ever deregistered (a call
# may be running this very function when the C++ kernels arrive); the C++ refuses tensors not in host memory.
_LAZY = "CompositeExplicitAutograd"
_lib.impl("mxfp4_moe", lambda *args: extension().mxfp4_moe(*args), _LAZY)
_lib.impl("mxfp4_moe_routed", lambda *args: extension().mxfp4_moe_routed(*args), _LAZY)
_lib.impl("mxfp4_grouped_mm", lambda x, b, s, o, bias=None: extension().mxfp4_grouped_mm(x, b, s, o, bias), _LAZY)
_lib.impl("bf16_grouped_mm", lambda x, w, o, bias=None: extension().bf16_grouped_mm(x, w, o, bias), _LAZY)
_lib.impl("bf16_linear", lambda x, w, bias=None: extension().bf16_linear(x, w, bias), _LAZY)
_lib.impl("decode_attention", lambda *args: extension().decode_attention(*args), _LAZY)
_lib.impl("prefill_attention", lambda *args: extension().prefill_attention(*args), _LAZY)
_lib.impl("rms_norm", lambda *args: extension().rms_norm(*args), _LAZY)
_lib.impl("add_rms_norm", lambda *args: extension().add_rms_norm(*args), _LAZY)
_lib.impl("rope", lambda *args: extension().rope(*args), _LAZY)
_lib.impl("cache_write", lambda *args: extension().cache_write(*args), _LAZY)


@torch.library.register_fake("gptoss::mxfp4_grouped_mm", lib=_lib)
def _(x, blocks, scales, offs, bias=None):
    return x.new_empty(x.shape[0], blocks.shape[1])


@torch.library.register_fake("gptoss::bf16_grouped_mm", lib=_lib)
def _(x, weight, offs, bias=None):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.register_fake("gptoss::mxfp4_moe", lib=_lib)
def _(x, weights, experts, *rest):
    return torch.empty_like(x)


@torch.library.register_fake("gptoss::mxfp4_moe_routed", lib=_lib)
def _(x, *rest):
    return torch.empty_like(x)


@torch.library.register_fake("gptoss::decode_attention", lib=_lib)
@torch.library.register_fake("gptoss::prefill_attention", lib=_lib)
def _(q, k_cache, v_cache, sinks, k_pos, q_pos, window, scale):
    return q.new_empty(q.shape)  # contiguous, as the kernels'


@torch.library.register_fake("gptoss::bf16_linear", lib=_lib)
def _(x, weight, bias=None):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("gptoss::rms_norm", lib=_lib)
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("gptoss::add_rms_norm", lib=_lib)
def _(x, residual, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("gptoss::rope", lib=_lib)
def _(x, cos, sin):
    return x.new_empty(x.shape)


@torch.library.register_fake("gptoss::cache_write", lib=_lib)
def _(cache, start, values):
    return None


mxfp4_grouped_mm = torch.ops.gptoss.mxfp4_grouped_mm
bf16_grouped_mm = torch.ops.gptoss.bf16_grouped_mm
bf16_linear = torch.ops.gptoss.bf16_linear
mxfp4_moe = torch.ops.gptoss.mxfp4_moe
mxfp4_moe_routed = torch.ops.gptoss.mxfp4_moe_routed
decode_attention = torch.ops.gptoss.decode_attention
prefill_attention = torch.ops.gptoss.prefill_attention
rms_norm = torch.ops.gptoss.rms_norm
add_rms_norm = torch.ops.gptoss.add_rms_norm
rope = torch.ops.gptoss.rope
cache_write = torch.ops.gptoss.cache_write
