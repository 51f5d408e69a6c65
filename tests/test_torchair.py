"""graph/torchair.py as far as a CPU allows: the CompilerConfig it builds, what it hands to
`torchair.inference.cache_compile` (bound prefill/decode methods, static shapes, per-rank cache directories), the
graphs dynamo traces from the npu op table (GE path: attention lengths as tensors) and their outputs, and the
project's manifest refusing or rebuilding mismatched artifacts. torch_npu and torchair are the test emulator; what
GE compilation does with the graphs cannot run here."""
import json
import os

import pytest
import torch

import gptoss.graph.artifacts as artifacts_module
from gptoss.graph import ArtifactDir, ArtifactMismatch, ShapePlan
from gptoss.graph.graphs import build_eager
from gptoss.graph.torchair import GraphEntry, build as build_torchair_graphs, check_torchair_mode, compiler_config, \
    configure_launch_env, torchair_options
from gptoss.model.kv_cache import KVCache
from gptoss.runtime import Settings
from npu_emulator import installed

BF16_MODEL = 0.15  # relative L2 of bf16 logits vs the fp32 torch op table (see tests/test_npu_ops.py)
SHAPES = ShapePlan(2, 128, 16, min_chunk=16, batch_buckets=(2,))  # one prefill and one decode graph


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from gptoss.tools.make_checkpoint import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("tiny_air"), {"num_hidden_layers": 2}, layout="fp32")


@pytest.fixture
def emu(monkeypatch):
    # other edits to model/ or graph/ while a test runs would change the real code hash between two builds
    monkeypatch.setattr(artifacts_module, "code_hash", lambda *a, **k: "a" * 64)
    with installed() as pair:
        yield pair


def _build(ckpt, shapes=SHAPES, ops_mode="ge", mode=None, **settings):
    from gptoss.model.loader import load_model
    model = load_model(ckpt, ops="npu", ops_mode=ops_mode, dtype=torch.bfloat16)
    cache = KVCache.allocate(model.config, model.plan, shapes.max_batch_size, shapes.slots, torch.bfloat16)
    graphs = build_torchair_graphs(model, shapes, cache, Settings(progress=False, **settings), mode=mode)
    return model, cache, graphs


def test_launch_env():
    env = {}
    assert configure_launch_env(env) == {"HCCL_OP_EXPANSION_MODE": "AIV"} and env["HCCL_OP_EXPANSION_MODE"] == "AIV"
    env = {"HCCL_OP_EXPANSION_MODE": "HOST"}
    assert configure_launch_env(env) == {} and env["HCCL_OP_EXPANSION_MODE"] == "HOST"  # the user's choice stays


def test_compiler_config(emu):
    _, air = emu
    config = compiler_config(air, "max-autotune")
    assert config.mode == "max-autotune"
    assert config.experimental_config.frozen_parameter is True
    assert config.experimental_config.tiling_schedule_optimize is False  # FIA in TND refuses tiling sink
    for mode in ("npugraph_ex", "reduce-overhead"):  # aclgraph: withdrawn, with the reason
        with pytest.raises(ValueError, match="withdrawn.*SymInt graph inputs"):
            torchair_options(mode)
    with pytest.raises(ValueError, match="unknown torchair mode"):
        torchair_options("fast")
    with pytest.raises(ValueError, match="no option"):  # the emulated config rejects names torchair lacks
        air.CompilerConfig().experimental_config.frozen_parameters = True


def test_rank_directories(tmp_path):
    assert ArtifactDir(tmp_path, 2, 1).torchair_graph("g") == tmp_path / "tp2-rank1" / "torchair" / "g"
    assert ArtifactDir(tmp_path).manifest_path == tmp_path / "tp1-rank0" / "manifest.json"


def test_requires_npu_op_table(emu, small):
    from gptoss.model.loader import load_model
    model = load_model(small, ops="torch")
    cache = KVCache.allocate(model.config, model.plan, 2, SHAPES.slots, torch.float32)
    with pytest.raises(ValueError, match="ops='npu'"):
        build_torchair_graphs(model, SHAPES, cache, Settings(progress=False))


def _run(graphs, cache):
    """Prefill two rows (lengths 5 and 16, one chunk of 16), then three decode steps; returns all logits."""
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 16))
    start, last = torch.zeros(2, dtype=torch.long), torch.tensor([4, 15])
    outs = [graphs.prefill(ids, start, last, cache.keys, cache.values, 128)]
    pos = torch.tensor([5, 16])
    for _ in range(3):
        tokens = torch.randint(0, 1000, (2,))
        outs.append(graphs.decode(tokens, pos, cache.keys, cache.values, 128))
        pos = pos + 1
    return outs


def test_build_load_and_refuse(emu, small, tmp_path, monkeypatch):
    npu, air = emu
    monkeypatch.delenv("HCCL_OP_EXPANSION_MODE", raising=False)
    art = tmp_path / "art"
    model, cache, graphs = _build(small, artifacts=art)
    rank_dir = art / "tp1-rank0"
    assert os.environ["HCCL_OP_EXPANSION_MODE"] == "AIV"

    # what cache_compile was given
    calls = air.cache_calls
    assert [c["func"].__name__ for c in calls] == ["prefill", "decode"]
    for c, kind in zip(calls, ("prefill", "decode")):
        assert isinstance(c["module"], GraphEntry) and c["module"].model is model and c["module"].spec.kind == kind
        assert c["dynamic"] is False and c["ge_cache"] is True
        assert (c["global_rank"], c["tp_rank"], c["pp_rank"]) == (0, 0, 0)
        assert c["cache_dir"] == str(rank_dir / "torchair" / c["module"].spec.name)
        assert c["config"].mode == "max-autotune" and c["config"].experimental_config.frozen_parameter is True
    assert [e for e, _ in air.cache_events] == ["compiled", "compiled"]
    assert air.traces == 2  # one full graph per entry point and shape
    # traced in GE mode: attention's lengths went in as tensors through torchair.ops
    assert npu.calls["torchair.ops.npu_fused_infer_attention_score_v2"] == 2 * model.config.num_hidden_layers
    assert npu.calls["npu_fused_infer_attention_score_v2"] == 0

    manifest = json.loads((rank_dir / "manifest.json").read_text())
    key = manifest["key"]
    assert key["backend"] == "torchair" and key["ops"] == "npu" and key["rank"] == 0 and key["tp_size"] == 1
    assert key["torch_npu"] == npu.__version__ and key["cann"] == "emulated"
    assert key["torchair_options"]["mode"] == "max-autotune" and "threads" not in key
    assert sorted(manifest["files"]) == ["decode_b2_t1_kv128", "prefill_b2_t16_kv128"]
    assert all((rank_dir / f).is_file() for f in manifest["files"].values())

    # the compiled graphs compute what the eager npu op table computes, and stay near the fp32 specification
    from gptoss.model.loader import load_model
    eager = load_model(small, ops="npu", dtype=torch.bfloat16)
    ref_model = load_model(small, ops="torch")
    eager_cache = KVCache.allocate(eager.config, eager.plan, 2, SHAPES.slots, torch.bfloat16)
    ref_cache = KVCache.allocate(ref_model.config, ref_model.plan, 2, SHAPES.slots, torch.float32)
    with torch.no_grad():
        got = _run(graphs, cache)
        same = _run(build_eager(eager, SHAPES, eager_cache, None), eager_cache)
        ref = _run(build_eager(ref_model, SHAPES, ref_cache, None), ref_cache)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, same))
    rel = max(float((a.float() - b).norm() / b.norm()) for a, b in zip(got, ref))
    print(f"\ntorchair (emulated GE path, bf16) vs eager npu op table: max |diff| {diff:.2e}; vs fp32 torch op "
          f"table: relative L2 {rel:.3f}")
    assert diff <= 1e-3 and rel <= BF16_MODEL

    # same everything: loaded from the cache, not compiled
    traces = air.traces
    _, _, again = _build(small, artifacts=art)
    assert again.loaded_from == rank_dir and [e for e, _ in air.cache_events][-2:] == ["loaded", "loaded"]
    assert air.traces == traces

    # different shapes, or different model code: refused, never reused
    other = ShapePlan(2, 128, 16, min_chunk=16, batch_buckets=(1, 2))
    with pytest.raises(ArtifactMismatch, match="graphs"):
        _build(small, shapes=other, artifacts=art)
    monkeypatch.setattr(artifacts_module, "code_hash", lambda *a, **k: "0" * 64)
    with pytest.raises(ArtifactMismatch, match="code_sha256"):
        _build(small, artifacts=art)
    n_compiled = sum(e == "compiled" for e, _ in air.cache_events)
    _, _, rebuilt = _build(small, artifacts=art, rebuild=True)
    assert rebuilt.loaded_from is None and sum(e == "compiled" for e, _ in air.cache_events) == n_compiled + 2
    assert json.loads((rank_dir / "manifest.json").read_text())["key"]["code_sha256"] == "0" * 64

    # a compiled file gone, a torchair cache without the project's manifest, nothing built yet: refused
    files = json.loads((rank_dir / "manifest.json").read_text())["files"]
    (rank_dir / files["decode_b2_t1_kv128"]).unlink()
    with pytest.raises(ArtifactMismatch, match="incomplete"):
        _build(small, artifacts=art)
    foreign = tmp_path / "foreign"
    (foreign / "tp1-rank0" / "torchair").mkdir(parents=True)
    with pytest.raises(ArtifactMismatch, match="no manifest"):
        _build(small, artifacts=foreign)
    with pytest.raises(ArtifactMismatch, match="build them first"):
        _build(small, artifacts=tmp_path / "empty", compile_missing=False)


def test_without_artifacts_uses_the_npu_backend(emu, small):
    _, air = emu
    _, _, graphs = _build(small)
    assert not air.cache_calls and air.backends[-1].mode == "max-autotune" and len(graphs.fns) == 2


def test_mode_checked_against_torchair_and_model(emu, small):
    """The installed torchair is asked before anything is built (7.3.0's CompilerConfig has no 'npugraph_ex'), and
    a model traced for another op-table mode is refused."""
    npu, air = emu
    with pytest.raises(ValueError, match="torchair .*torch_npu 2.13.0.* does not accept mode 'npugraph_ex'"):
        check_torchair_mode(air, npu, "npugraph_ex")
    check_torchair_mode(air, npu, "max-autotune")
    with pytest.raises(ValueError, match="ops_mode='eager'.*ops_mode='ge'"):
        _build(small, ops_mode="eager")
    with pytest.raises(ValueError, match="withdrawn"):
        _build(small, mode="npugraph_ex")


def test_manifest_records_options_as_built(emu, small, tmp_path):
    _build(small, artifacts=tmp_path)
    options = json.loads((tmp_path / "tp1-rank0" / "manifest.json").read_text())["key"]["torchair_options"]
    assert options == {"mode": "max-autotune", "experimental_config.frozen_parameter": True,
                       "experimental_config.tiling_schedule_optimize": False}


def test_mixed_step_on_the_npu_table(emu, small):
    """Mixed steps (a decode step and a prompt chunk on the cache's staging row, one graph) build through torchair
    from the npu op table and give what the two entry points give separately."""
    from gptoss.model.loader import load_model
    shapes = ShapePlan(2, 128, 16, min_chunk=16, batch_buckets=(2,), mixed=True)
    model = load_model(small, ops="npu", ops_mode="ge", dtype=torch.bfloat16)
    cache = KVCache.allocate(model.config, model.plan, 2, shapes.slots, torch.bfloat16, staging=True)
    graphs = build_torchair_graphs(model, shapes, cache, Settings(progress=False))
    assert {s.kind for s in graphs.fns} == {"prefill", "decode", "mixed"}
    torch.manual_seed(0)
    zero = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        graphs.prefill(torch.randint(0, 1000, (2, 16)), torch.zeros(2, dtype=torch.long), torch.tensor([4, 15]),
                       *cache.rows(2), 128)
        tokens, pos, chunk = torch.randint(0, 1000, (2,)), torch.tensor([5, 16]), torch.randint(0, 1000, (1, 16))
        before = [t.clone() for t in cache.keys + cache.values]
        got = graphs.mixed(tokens, pos, *cache.rows(2), chunk, zero, torch.tensor([15]), *cache.staging(), 128)
        after = [t.clone() for t in cache.keys + cache.values]
        for t, b in zip(cache.keys + cache.values, before):
            t.copy_(b)
        eager = load_model(small, ops="npu", ops_mode="eager", dtype=torch.bfloat16)  # the reference, outside graphs
        want = torch.cat([eager.decode(tokens, pos, *cache.rows(2), 128),
                          eager.prefill(chunk, zero, torch.tensor([15]), *cache.staging(), 128)])
    assert got.shape == (3, model.config.vocab_size)
    assert (got.float() - want.float()).norm() / want.float().norm() < 2e-2  # bf16: sums may group differently
    for t, a in zip(cache.keys + cache.values, after):  # the same cache writes, rows and staging row
        assert torch.allclose(t.float(), a.float(), atol=2e-2, rtol=2e-2)
