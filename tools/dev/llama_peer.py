"""llama.cpp as the peer engine of the benchmark: the same checkpoint, converted by llama.cpp's own converter.

    python -m gptoss.tools.dev.llama_peer --model checkpoints/bench --threads 2 [--kind mxfp4|f32] [--json out]
    python -m gptoss.tools.dev.llama_peer --model DIR --check-logits      # fp32 logits vs the F32 GGUF
    python -m gptoss.tools.dev.llama_peer --model DIR --build avx2        # llama.cpp without AVX-512

llama.cpp lives in its own virtualenv (``build/llama-venv``; never a dependency of this project): the first call
creates it, downloads the ``llama-cpp-python`` sdist (pinned: :data:`LLAMA_CPP_PYTHON`), builds it for this CPU
(``GGML_NATIVE``; minutes on 2 cores; ``--build avx2``: AVX2 only, in ``build/llama-venv-avx2``) and keeps the
llama.cpp source of that sdist for its ``convert_hf_to_gguf.py`` and ``gguf-py``.  Everything llama.cpp computes
runs in a child process of that virtualenv (:mod:`gptoss.tools.dev.llama_worker`), one at a time, so a benchmark
can interleave rounds of both engines without them ever computing at once.

GGUF kinds, as llama.cpp converts GPT-OSS:

* ``mxfp4``: the checkpoint as published (experts MXFP4, kept packed; dense weights ``--outtype bf16``);
* ``f32``: every weight fp32.  The converter keeps MXFP4 experts packed whatever ``--outtype`` says, so this one is
  converted from an fp32 copy of the checkpoint (experts decoded exactly, written transformers-style) made in a
  temporary directory.

GGUFs are cached in ``build/llama-venv/gguf`` under a key of the checkpoint's path, file sizes and mtimes.
:func:`measure` returns prefill tok/s of a 512-token prompt and greedy decode tok/s at batch 1 and 8 (prompts of
32 tokens, ``decode_tokens`` steps, EOS ignored), the same protocol as this project's benchmark, with random token
ids from the same kind of generator.  Before the first measurement on a GGUF the tokenizers are compared: llama.cpp
must give the ids of the checkpoint's ``tokenizer.json`` on sample text, else :class:`PeerError`.

llama.cpp always rounds YaRN's correction range (it ignores ``truncate: false``, which GPT-OSS's config sets), so
its logits match this runtime's only on a checkpoint with ``truncate: true``
(``make_checkpoint --yarn-truncate``); :func:`compare_logits` reports max |Δlogits| on such a checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = ROOT / "build" / "llama-venv"
# llama.cpp builds: "native" (GGML_NATIVE: every extension this CPU has) or "avx2" (AVX2 + FMA + F16C, no AVX-512),
# the peer of this project's forced AVX2 path (GPTOSS_CPU_ISA=avx2) on a machine that has AVX-512. Each build lives
# in its own virtualenv. Later -D flags win in CMake, so "avx2" overrides the native default.
BUILDS = {
    "native": ("-DGGML_NATIVE=ON", DEFAULT_VENV),
    "avx2": ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
             "-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF "
             "-DGGML_AVX512_BF16=OFF", ROOT / "build" / "llama-venv-avx2"),
}
LLAMA_CPP_PYTHON = "0.3.36"
# The converter's own needs (the runtime's venv is not used for anything llama.cpp does); torch pinned: an open
# range pulls a CUDA build of several GB.
CONVERTER_DEPS = ["torch==2.13.0", "transformers", "safetensors", "numpy", "tqdm", "pyyaml", "requests"]
KINDS = {"mxfp4": "bf16", "f32": "f32"}  # GGUF kind -> convert_hf_to_gguf --outtype
PROMPT_LEN, SHORT_PROMPT = 512, 32
SAMPLE_TEXTS = [
    "Hello, world! The model reads 42 tokens, one at a time.",
    "  two  spaces\nnew line\ttab ünïcödé 🙂 and 3.14159 'quoted' it's we'll",
    "The small model reads a line of text and guesses what comes next.",
]
WORKER = Path(__file__).with_name("llama_worker.py")


class PeerError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------- virtualenv


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def llama_cpp_source(venv: Path = DEFAULT_VENV) -> Path:
    """The llama.cpp tree of the sdist the venv was built from (convert_hf_to_gguf.py, conversion/, gguf-py/)."""
    return venv / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


def venv_for(build: str) -> Path:
    if build not in BUILDS:
        raise PeerError(f"unknown llama.cpp build {build!r} (known: {', '.join(BUILDS)})")
    return BUILDS[build][1]


def _build_flags(venv: Path) -> str:
    """The CMake flags of the build that lives in ``venv`` (a venv of no known build gets the native one)."""
    return next((flags for flags, path in BUILDS.values() if Path(path) == Path(venv)), BUILDS["native"][0])


def ensure_venv(venv: Path = DEFAULT_VENV, log=print) -> Path:
    """Create the llama.cpp virtualenv if it is not complete; returns its python. The build's CMake flags follow
    from the venv (:data:`BUILDS`); CMAKE_ARGS in the environment come after them, so they win."""
    py = _venv_python(venv)
    stamp = venv / f".llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if stamp.exists() and llama_cpp_source(venv).joinpath("convert_hf_to_gguf.py").exists():
        return py
    if not py.exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        subprocess.run([str(py), "-m", "ensurepip"], check=True)
    src = venv / "src"
    sdist = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
        subprocess.run(
            [str(py), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(src)],
            check=True,
        )  # fmt: skip
    if not llama_cpp_source(venv).exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(src, filter="data")
    flags = _build_flags(venv)
    log(f"building llama-cpp-python {LLAMA_CPP_PYTHON} ({flags}; several minutes)")
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    env["CMAKE_ARGS"] = f"{flags} -DLLAVA_BUILD=OFF " + env.get("CMAKE_ARGS", "")
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(sdist)], check=True, env=env)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *CONVERTER_DEPS], check=True)
    stamp.touch()
    return py


def _run_worker(job: dict, venv: Path, timeout: float | None = None) -> dict:
    py = ensure_venv(venv)
    res = subprocess.run([str(py), str(WORKER), json.dumps(job)], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise PeerError(f"llama.cpp {job['job']} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------- GGUFs


def _checkpoint_key(model_dir: Path) -> str:
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for p in sorted(model_dir.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{model_dir.name}-{h.hexdigest()[:12]}"


def _write_fp32_copy(model_dir: Path, out: Path) -> None:
    """The checkpoint with every weight fp32 (experts decoded exactly to transformers' [E, in, out]), one
    safetensors file per layer, so the converter writes an all-F32 GGUF."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gptoss.model.mxfp4 import dequantize_mxfp4

    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise PeerError(f"{model_dir} has no model*.safetensors")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    weight_map = {}
    handles = [safe_open(f, "pt") for f in files]
    names = {k: h for h in handles for k in h.keys()}
    for name in sorted(names):
        if name.endswith("_scales"):
            continue
        h = names[name]
        if name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            t = dequantize_mxfp4(h.get_tensor(name), names[base + "_scales"].get_tensor(base + "_scales"))
            name, t = base, t.transpose(1, 2).contiguous()
        else:
            t = h.get_tensor(name).float()
        parts = name.split(".")
        group = f"layer{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "other"
        groups.setdefault(group, {})[name] = t
    for group, tensors in groups.items():
        fname = f"model-{group}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    total = sum(t.numel() * 4 for g in groups.values() for t in g.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for p in model_dir.iterdir():
        if p.is_file() and not p.name.startswith("model") and p.name != "config.json":
            shutil.copy2(p, out / p.name)


def gguf_path(model_dir: str | Path, kind: str = "mxfp4", venv: Path = DEFAULT_VENV, log=print,
              cache_dir: Path | None = None) -> Path:
    """The GGUF of ``model_dir`` (converting it the first time) with its tokenizer checked against ours; cached in
    ``cache_dir`` (default ``<venv>/gguf``)."""
    if kind not in KINDS:
        raise PeerError(f"unknown GGUF kind {kind!r}; choose from {sorted(KINDS)}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise PeerError(f"{model_dir} is not a checkpoint directory (no config.json)")
    out = Path(cache_dir or venv / "gguf") / f"{_checkpoint_key(model_dir)}-{kind}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_venv(venv, log)
    partial = out.with_suffix(".partial")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = model_dir
        if kind == "f32":
            log(f"writing an fp32 copy of {model_dir} for the F32 GGUF")
            src = Path(tmp)
            _write_fp32_copy(model_dir, src)
        log(f"converting {model_dir} -> {out.name} (convert_hf_to_gguf.py of llama.cpp, --outtype {KINDS[kind]})")
        job = {"job": "convert", "llama_cpp_dir": str(llama_cpp_source(venv)), "model_dir": str(src),
               "outfile": str(partial), "outtype": KINDS[kind]}  # fmt: skip
        info = _run_worker(job, venv)
    if info.get("pre_tokenizer_mapped"):
        log(f"pre-tokenizer hash unknown to llama.cpp: mapped to {info['pre_tokenizer_mapped']!r}")
    check_tokenizer(model_dir, partial, venv)
    partial.rename(out)
    return out


def check_tokenizer(model_dir: Path, gguf: Path, venv: Path = DEFAULT_VENV) -> None:
    """llama.cpp's ids for SAMPLE_TEXTS must equal those of the checkpoint's tokenizer.json."""
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    expected = [ours.encode(t, add_special_tokens=False).ids for t in SAMPLE_TEXTS]
    got = _run_worker({"job": "tokenize", "gguf": str(gguf), "texts": SAMPLE_TEXTS}, venv)["ids"]
    for text, e, g in zip(SAMPLE_TEXTS, expected, got):
        if e != g:
            raise PeerError(f"llama.cpp tokenizes {text!r} as {g}, the checkpoint's tokenizer as {e}")


# ------------------------------------------------------------------------------------------------- measure


def _prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(n * 1000 + length)
    return [torch.randint(10, vocab - 10, (length,), generator=g).tolist() for _ in range(n)]


def cpu_isa() -> str:
    """The widest x86 vector extension this CPU reports (AVX-512 with bf16, AVX-512, AVX2, ...)."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return platform.machine()
    if "avx512f" in flags:
        return "AVX-512 with bf16" if "avx512_bf16" in flags else "AVX-512"
    for name in ("avx2", "avx", "sse4_2"):
        if name in flags:
            return name.upper().replace("_", ".")
    return platform.machine()


def built_isa(system_info: str) -> str:
    """The widest x86 vector extension a llama.cpp build uses, from its system info ("AVX512 = 1 | ...")."""
    on = {m.group(1) for m in re.finditer(r"(\w+) = 1", system_info)}
    if "AVX512" in on:
        return "AVX-512 with bf16" if "AVX512_BF16" in on else "AVX-512"
    for name in ("AVX2", "AVX", "SSE3"):
        if name in on:
            return name
    return "unknown"


def measure(model_dir: str | Path, threads: int, kind: str = "mxfp4", decode_tokens: int = 32,
            batches: tuple[int, ...] = (1, 8), rounds: int = 3, venv: Path = DEFAULT_VENV, log=print,
            cache_dir: Path | None = None, prompt_len: int = PROMPT_LEN) -> dict:
    """llama.cpp on ``model_dir`` (GGUF ``kind``) in a child process: prefill of a ``prompt_len``-token prompt
    (512 by default) and greedy decode at each batch, ``threads`` threads. Returns ``{"prefill_tok_s",
    "decode_b1_tok_s", ...}`` plus the engine's details."""
    gguf = gguf_path(model_dir, kind, venv, log, cache_dir)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    job = {
        "job": "bench", "gguf": str(gguf), "threads": threads, "rounds": rounds, "decode_tokens": decode_tokens,
        "prefill_ids": _prompts(vocab, 1, prompt_len)[0],
        "decode_prompts": [_prompts(vocab, b, SHORT_PROMPT) for b in batches],
    }  # fmt: skip
    res = _run_worker(job, venv)
    res.update(engine=f"llama.cpp (llama-cpp-python {res.pop('llama_cpp_python')})", gguf=str(gguf), kind=kind,
               cpu=cpu_isa(), built_for=built_isa(res.get("system_info", "")),
               gguf_bytes=gguf.stat().st_size)  # fmt: skip
    for b in batches:
        res.pop(f"decode_b{b}_tokens")
    return res


def compare_logits(model_dir: str | Path, threads: int = 2, length: int = 200, venv: Path = DEFAULT_VENV,
                   log=print, cache_dir: Path | None = None) -> dict:
    """Max |Δ| between this project's fp32 logits (eager model, every position of a ``length``-token prompt)
    and llama.cpp's F32 GGUF; meaningful on a checkpoint with YaRN ``truncate: true``."""
    import numpy as np
    import torch

    from gptoss.model.gpt_oss import Tokens
    from gptoss.model.kv_cache import KVCache
    from gptoss.model.loader import load_model

    config = json.loads((Path(model_dir) / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    gguf = gguf_path(model_dir, "f32", venv, log, cache_dir)
    ids = _prompts(config["vocab_size"], 1, length)[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npy"
        _run_worker({"job": "logits", "gguf": str(gguf), "threads": threads, "ids": ids, "out": str(out)}, venv)
        theirs = torch.from_numpy(np.load(out))
    model = load_model(model_dir)
    cache = KVCache.allocate(model.config, model.plan, 1, length, torch.float32)
    with torch.no_grad():
        x = torch.tensor([ids])
        h = model.hidden([Tokens(x, torch.arange(length)[None], torch.zeros(1, dtype=torch.long), cache.keys,
                                 cache.values)], length)
        ours = model.logits(h)
    diff = (ours - theirs).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "logit_scale": ours.abs().max().item(),
        "argmax_agree": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
        "positions": length,
        "yarn_truncate": rope.get("truncate", True),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gptoss.tools.dev.llama_peer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (published layout)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kind", choices=sorted(KINDS), action="append", help="GGUF kind(s) to measure (default mxfp4)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="prefill repetitions (best is kept)")
    ap.add_argument("--prompt-len", type=int, default=PROMPT_LEN, help="tokens of the timed prefill")
    ap.add_argument("--build", choices=sorted(BUILDS), default="native",
                    help="llama.cpp build: native (this CPU's extensions) or avx2 (no AVX-512); each its own venv")
    ap.add_argument("--venv", type=Path, help="the virtualenv (default: the build's, see BUILDS)")
    ap.add_argument("--check-logits", action="store_true", help="compare fp32 logits with the F32 GGUF instead")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  (stdout is the JSON)
    args.venv = args.venv or venv_for(args.build)
    if args.check_logits:
        result = compare_logits(args.model, args.threads, venv=args.venv, log=log)
    else:
        result = {k: measure(args.model, args.threads, k, args.decode_tokens, rounds=args.rounds, venv=args.venv,
                             log=log, prompt_len=args.prompt_len) for k in (args.kind or ["mxfp4"])}  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
