"""Weights kept as published (MXFP4 experts packed, matrices in their stored dtype) give the dense fp32 model's
results: max |dlogits| <= 1e-4 over a prefill that crosses the sliding window and 30 decode steps, the same greedy
tokens, at TP 1, 2 and 4 (splits of the expert width inside a 32-value MXFP4 block included), eagerly and as
inductor graphs that a second process loads from their artifacts."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptoss.model.kv_cache import KVCache
from gptoss.model.loader import load_model
from gptoss.runtime import Runtime, Settings
from gptoss.tools.cli import add_runtime_args, settings_from_args
from gptoss.tools.make_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import tp_worker  # noqa: E402

TOL = 1e-4
PREFILL, DECODE = 45, 30
# Expert widths 64 and 96: at TP 2/4 the down_proj input slices (32/16, 48/24 wide) start or end inside a block.
CONFIGS = {
    "kvrep": dict(num_attention_heads=4, num_key_value_heads=2),
    "width96": dict(vocab_size=1021, hidden_size=96, intermediate_size=96, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=12, num_hidden_layers=3,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {name: make_checkpoint(root / name, cfg, layout="mxfp4", seed=i)
            for i, (name, cfg) in enumerate(CONFIGS.items())}


def _logits(model, ids):
    """Prefill of PREFILL tokens (crossing every window of the configs), then DECODE teacher-forced steps."""
    with torch.no_grad():
        cache = KVCache.allocate(model.config, model.plan, ids.shape[0], 128, torch.float32)
        out = [model.prefill(ids[:, :PREFILL], torch.zeros(ids.shape[0], dtype=torch.long),
                             torch.full((ids.shape[0],), PREFILL - 1), cache.keys, cache.values, 128)]
        for t in range(PREFILL, PREFILL + DECODE):
            out.append(model.decode(ids[:, t], torch.full((ids.shape[0],), t), cache.keys, cache.values, 128))
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_published_equals_dense_tp1(name, ckpts, one_thread):
    dense, published = load_model(ckpts[name], weights="dense"), load_model(ckpts[name], weights="published")
    assert (dense.weights, published.weights) == ("dense", "published")
    assert published.layers[0].mlp.packed and published.lm_head.dtype == torch.bfloat16
    assert published.dtype == torch.float32
    ids = torch.randint(0, dense.config.vocab_size, (2, PREFILL + DECODE), generator=torch.Generator().manual_seed(0))
    want, got = _logits(dense, ids), _logits(published, ids)
    print(f"\n{name}: published vs dense fp32, max|dlogits| {(got - want).abs().max().item():.2e}")
    assert (got - want).abs().max() <= TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("layout", ["bf16", "fp32"])
def test_unquantised_checkpoint_keeps_its_dtypes(layout, tmp_path, one_thread):
    """Without packed experts, "published" means the stored dtypes: bf16 matrices and experts stay bf16, an fp32
    checkpoint stays fp32 (nothing rounded)."""
    ckpt = make_checkpoint(tmp_path / layout, CONFIGS["kvrep"], layout=layout)
    dense, published = load_model(ckpt, weights="dense"), load_model(ckpt, weights="published")
    stored = torch.bfloat16 if layout == "bf16" else torch.float32
    mlp = published.layers[0].mlp
    assert not mlp.packed and mlp.gate_up_proj.dtype == stored and mlp.router.weight.dtype == stored
    assert published.layers[0].self_attn.qkv_proj.weight.dtype == stored and published.embed_tokens.dtype == stored
    ids = torch.randint(0, dense.config.vocab_size, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(2))
    assert (_logits(published, ids) - _logits(dense, ids)).abs().max() <= TOL


def test_tp_slices_inside_a_block_hold_exactly_the_slice(ckpts):
    """Each rank's packed down_proj decodes to its rows of the dense weight; the covering blocks' other codes are 0."""
    from gptoss.model.mxfp4 import dequantize_mxfp4
    full = load_model(ckpts["width96"], weights="dense")
    for tp in (2, 4):
        for rank in range(tp):
            m = load_model(ckpts["width96"], tp_size=tp, rank=rank, weights="published")
            i0, n = m.plan.intermediate_start, m.plan.intermediate
            for a, b in zip(m.layers, full.layers):
                before, after = a.mlp.down_pad
                w = dequantize_mxfp4(a.mlp.down_blocks, a.mlp.down_scales)  # [E, H, covering columns]
                assert w.shape[-1] == before + n + after and (before or after or n % 32 == 0)
                assert torch.equal(w[..., before:before + n], b.mlp.down_proj[:, i0:i0 + n].transpose(1, 2))
                assert not w[..., :before].any() and not w[..., before + n:].any()


def test_memory_is_the_published_size(ckpts):
    """Held bytes: the checkpoint's (bf16 matrices, packed experts) plus fp32 norms/biases, not the dense fp32."""
    ckpt = ckpts["width96"]
    size = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors"))
    held = {w: sum(p.numel() * p.element_size() for p in load_model(ckpt, weights=w).parameters())
            for w in ("published", "dense")}
    print(f"\nfile {size} B, published {held['published']} B, dense {held['dense']} B")
    assert held["published"] <= 1.3 * size < held["dense"]


def _backing_file(t: torch.Tensor) -> str | None:
    """The file mapped where `t`'s memory lies (None: anonymous memory), from /proc/self/maps."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                path = fields[5].strip() if len(fields) > 5 else ""
                return path if path.startswith("/") else None
    raise AssertionError("address not mapped")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_experts_and_embedding_are_used_in_place_from_the_file(ckpts, one_thread):
    """mmap=True (the default): the MXFP4 experts and the embedding are views of the checkpoint file (no copy),
    everything else is the process's own memory; the results are bit-identical to the copied model's."""
    ckpt = ckpts["width96"]
    shard = str(next(Path(ckpt).glob("*.safetensors")).resolve())
    mapped, copied = load_model(ckpt, weights="published"), load_model(ckpt, weights="published", mmap=False)
    in_place = {"embed_tokens"} | {f"layers.{i}.mlp.{w}_{k}" for i in range(len(mapped.layers))
                                   for w in ("gate_up", "down") for k in ("blocks", "scales")}
    for (name, p), (_, q) in zip(mapped.named_parameters(), copied.named_parameters()):
        assert _backing_file(p) == (shard if name in in_place else None), name
        assert _backing_file(q) is None and torch.equal(p, q), name
    ids = torch.randint(0, 1021, (2, PREFILL + DECODE), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(mapped, ids), _logits(copied, ids))
    dense = load_model(ckpt, weights="dense")
    assert all(_backing_file(p) is None for p in dense.parameters())  # (decoded at load: nothing to map)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_a_sharded_checkpoint_is_used_in_place_shard_by_shard(tmp_path, one_thread):
    ckpt = make_checkpoint(tmp_path / "sharded", CONFIGS["kvrep"], layout="mxfp4", seed=5, num_shards=3)
    shards = {str(p.resolve()) for p in Path(ckpt).glob("*.safetensors")}
    mapped, copied = load_model(ckpt, weights="published"), load_model(ckpt, weights="published", mmap=False)
    backing = {_backing_file(b.mlp.gate_up_blocks) for b in mapped.layers} | {_backing_file(mapped.embed_tokens)}
    assert len(shards) == 3 and backing <= shards and len(backing) > 1
    ids = torch.randint(0, mapped.config.vocab_size, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(4))
    assert torch.equal(_logits(mapped, ids), _logits(copied, ids))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_a_tp_rank_maps_only_what_it_holds_as_stored(ckpts):
    """Under TP a rank's experts are some rows of each expert (gate_up) or zero-padded blocks (down): copied. Its
    embedding rows are mapped unless the last rank pads them (vocab 1021 over 2 ranks: 511 + 510 and a pad)."""
    ckpt = ckpts["width96"]
    for rank in range(2):
        m = load_model(ckpt, tp_size=2, rank=rank, weights="published")
        assert _backing_file(m.layers[0].mlp.gate_up_blocks) is None
        assert _backing_file(m.layers[0].mlp.down_scales) is None
        assert (_backing_file(m.embed_tokens) is not None) == (rank == 0)
        assert not any(p.is_meta for p in m.parameters())


def test_runtime_and_commands_take_the_mmap_setting(ckpts):
    ap = argparse.ArgumentParser()
    add_runtime_args(ap)
    assert settings_from_args(ap.parse_args(["--model", "m"])).mmap is True
    assert settings_from_args(ap.parse_args(["--model", "m", "--no-mmap"])).mmap is False
    ckpt = ckpts["kvrep"]
    for mmap in (True, False):
        rt = Runtime.from_pretrained(ckpt, Settings(backend="eager", max_batch_size=1, max_seq_len=64, mmap=mmap,
                                                    progress=False))
        assert (_backing_file(rt.model.layers[0].mlp.gate_up_blocks) is not None) == mmap


def test_published_is_cpu_only_and_named(ckpts):
    with pytest.raises(ValueError, match="unknown weights='packed'"):
        load_model(ckpts["kvrep"], weights="packed")
    with pytest.raises(ValueError, match="weights='published' has kernels for CPU only"):
        load_model(ckpts["kvrep"], weights="published", device="meta")


# -- tensor parallelism ---------------------------------------------------------------------------------------
def _torchrun(nproc: int, out: Path, backend: str, ckpts: dict, **env) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "tests" / "tp_worker.py"), "parity", str(out), backend, *map(str, ckpts.values())]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", **env)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def dense_tp1(ckpts):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: tp_worker.parity(str(path), "eager") for name, path in ckpts.items()}  # loader default
    finally:
        torch.set_num_threads(threads)


def _compare(out: Path, ckpts: dict, ref: dict, tp: int, backend: str) -> None:
    for name in ckpts:
        ranks = [torch.load(out / f"{name}_{backend}_rank{r}.pt") for r in range(tp)]
        r0 = ranks[0]
        assert r0["weights"] == "published" and r0["tp"] == tp
        d_prefill = (r0["prefill"] - ref[name]["prefill"]).abs().max().item()
        d_decode = (r0["decode"] - ref[name]["decode"]).abs().max().item()
        print(f"\n{name} TP{tp} {backend} published vs TP1 dense: max|dlogits| prefill {d_prefill:.2e}, "
              f"decode {d_decode:.2e}; expert width per rank {r0['plan']['intermediate']}")
        assert d_prefill <= TOL and d_decode <= TOL
        assert r0["greedy"] == ref[name]["greedy"]
        assert all(r["greedy"] == r0["greedy"] and r["sampled"] == r0["sampled"] for r in ranks)


@pytest.mark.parametrize("tp", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(4, marks=pytest.mark.slow)])
def test_tp_published_matches_tp1_dense(tp, ckpts, dense_tp1, tmp_path):
    assert load_model(ckpts["kvrep"]).weights == "dense", "the reference must be the dense model"
    _torchrun(tp, tmp_path, "eager", ckpts, TP_WORKER_WEIGHTS="published")
    _compare(tmp_path, ckpts, dense_tp1, tp, "eager")


# -- graphs -----------------------------------------------------------------------------------------------------
SETTINGS = dict(max_batch_size=2, max_seq_len=64, prefill_chunk=16, batch_sizes=[2], progress=False)
PROMPTS = [[5, 17, 300, 2, 9, 44, 12, 8, 3, 1, 400, 41, 7, 7, 9, 10, 11, 600, 3], [8, 9, 10]]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("pub_graphs") / "ckpt",
                           dict(CONFIGS["width96"], num_hidden_layers=2,
                                layer_types=["sliding_attention", "full_attention"]), layout="mxfp4")


@pytest.mark.slow
def test_inductor_graphs_with_published_weights(small_ckpt, tmp_path):
    """Compiled == eager with published weights; the manifest records the format; a second process loads the
    graphs (with the kernel ops) without compiling and generates the same tokens."""
    artifacts = tmp_path / "artifacts"
    compiled = Runtime.from_pretrained(small_ckpt, backend="inductor", artifacts=artifacts, weights="published",
                                       compiled="all", **SETTINGS)  # prompt graphs too (CPU's default: decode)
    eager = Runtime.from_pretrained(small_ckpt, weights="published", **SETTINGS)
    want = [r.token_ids for r in eager.generate(PROMPTS, max_new_tokens=20)]
    assert [r.token_ids for r in compiled.generate(PROMPTS, max_new_tokens=20)] == want
    ids = torch.tensor([p[:3] for p in PROMPTS])
    with torch.no_grad():
        got = compiled._decode(ids[:, 0].contiguous(), torch.tensor([3, 3]), compiled.shapes.kv_len(4))
        ref = eager._decode(ids[:, 0].contiguous(), torch.tensor([3, 3]), eager.shapes.kv_len(4))
    assert (got - ref).abs().max() <= TOL
    manifest = json.loads((artifacts / "tp1-rank0" / "manifest.json").read_text())
    assert manifest["key"]["weights"] == "published"

    script = textwrap.dedent(f"""
        import json, sys
        from torch._inductor import cpp_builder
        def refuse(self):
            if not self._preprocessing:
                raise AssertionError("C++ compiler invoked: the artifacts were not reused")
            return original(self)
        original = cpp_builder.CppBuilder.build
        cpp_builder.CppBuilder.build = refuse
        from torch._dynamo.utils import counters
        from gptoss.runtime import Runtime
        rt = Runtime.from_pretrained({str(small_ckpt)!r}, backend="inductor", artifacts={str(artifacts)!r},
                                     compile_missing=False, weights="published", **{SETTINGS!r})
        tokens = [r.token_ids for r in rt.generate({PROMPTS!r}, max_new_tokens=20)]
        print(json.dumps({{"tokens": tokens, "frames": dict(counters["frames"]), "loaded": str(rt.graphs.loaded_from)}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tokens"] == want and report["frames"] == {} and report["loaded"] == str(artifacts / "tp1-rank0")

    with pytest.raises(Exception, match="weights"):  # dense weights are another graph
        Runtime.from_pretrained(small_ckpt, backend="inductor", artifacts=artifacts, weights="dense", **SETTINGS)
