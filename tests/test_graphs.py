"""Compiled graphs (inductor, CPU): equal to eager, no compilation in steady state, reusable from another process,
refused when built for something else. One artifact directory is compiled once for the whole module (the
compile is the slow part: ~4 graphs, a couple of minutes on 2 cores)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from gptoss.graph import ArtifactMismatch
from gptoss.runtime import Runtime
from gptoss.graph import ShapePlan
from gptoss.graph.shapes import GraphSpec
from gptoss.tools.make_checkpoint import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(max_batch_size=4, max_seq_len=128, prefill_chunk=16, batch_sizes=[1, 4])
# every entry point compiled (CPU's default compiles decode only: test_decode_only_graphs), and the server's
# mixed-step graphs
SERVING = dict(SETTINGS, mixed_steps=True, compiled="all")
PROMPTS = [[5, 17, 300, 2, 9, 44, 12, 8, 3, 1, 400, 41, 7, 7, 9, 10, 11, 600, 3],
           [8, 9], list(range(100, 137)), [900, 3, 5, 7, 11]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", layout="mxfp4")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    rt = Runtime.from_pretrained(checkpoint, backend="inductor", artifacts=out, progress=False, **SERVING)
    return out, rt


@pytest.fixture(scope="module")
def eager(checkpoint):
    """The reference: eager, every layer on a full-length cache (the compiled runtime's sliding layers use rings)."""
    return Runtime.from_pretrained(checkpoint, window_cache="full", **SETTINGS)


def _step_logits(rt, prompts, steps):
    """Prefill then `steps` greedy decode steps through the runtime's own graphs; all logits."""
    n = len(prompts)
    rows = rt.shapes.batch(n)
    lengths = torch.tensor([len(p) for p in prompts] + [1] * (rows - n))
    with torch.no_grad():
        logits = rt._prefill_batch(prompts + [[0]] * (rows - n), lengths)
        out, pos = [logits[:n]], lengths.clone()
        for _ in range(steps):
            tokens = logits.argmax(-1)
            logits = rt._decode(tokens, pos, rt.shapes.kv_len(int(pos.max()) + 1))
            out.append(logits[:n].clone())
            pos += 1
    return torch.stack(out)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch4-mixed"])
def test_compiled_equals_eager(artifacts, eager, prompts):
    """Compiled with ring caches (window 8 + chunk 16 - 1 = 23 slots: 64 decode steps wrap them ~4 times) against
    eager on full-length caches."""
    compiled = artifacts[1]
    assert sorted({k.shape[1] for k in compiled.cache.keys}) == [23, 128]
    assert {k.shape[1] for k in eager.cache.keys} == {128}
    got, want = _step_logits(compiled, prompts, 64), _step_logits(eager, prompts, 64)
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert [r.token_ids for r in compiled.generate(prompts, max_new_tokens=40)] == \
           [r.token_ids for r in eager.generate(prompts, max_new_tokens=40)]


def test_steady_state_compiles_nothing(artifacts, monkeypatch):
    rt = artifacts[1]
    rt.generate(PROMPTS, max_new_tokens=4)  # warm-up
    builds = []
    from torch._inductor import cpp_builder
    original = cpp_builder.CppBuilder.build
    monkeypatch.setattr(cpp_builder.CppBuilder, "build", lambda self: builds.append(1) or original(self))
    before = json.dumps(counters, sort_keys=True, default=str)

    decode_steps = 0
    for prompts in ([PROMPTS[1]], [PROMPTS[3]] * 3):  # 200 decode steps, at batch 1 and batch 4
        assert len(rt.generate(prompts, max_new_tokens=101, ignore_eos=True)[0].token_ids) == 101
        decode_steps += rt.last_stats.decode_steps
    assert decode_steps == 200
    assorted = [list(range(1, n + 1)) for n in (1, 2, 3, 5, 8, 15, 16, 17, 33, 60)]
    rt.generate(assorted, max_new_tokens=3)  # 10 prompts of assorted lengths, in 3 batches

    assert builds == []
    assert json.dumps(counters, sort_keys=True, default=str) == before


def test_graphs_call_the_generated_code_directly(artifacts):
    """After its first call, every compiled graph runs inductor's generated code without dynamo's and AOTAutograd's
    layers (graph/direct_call.py); a step that way and through the layers gives the same logits and cache."""
    rt = artifacts[1]
    rt.generate(PROMPTS, max_new_tokens=4)
    bound = {s: f for s, f in rt.graphs.fns.items() if hasattr(f, "direct")}
    called = {s: f for s, f in bound.items() if f._checked}
    assert {s.kind for s in called} >= {"prefill", "decode"}
    assert all(f.direct is not None for f in called.values()), [s.name for s, f in called.items() if not f.direct]
    keys, values = rt.cache.rows(4)
    saved = [t.clone() for t in keys + values]
    ids, pos, kv = torch.tensor([3, 5, 7, 9]), torch.tensor([20, 2, 37, 5]), rt.shapes.kv_len(38)
    fn = rt.graphs.fns[GraphSpec("decode", 4, 1, kv)]
    with torch.no_grad():
        direct = fn(ids, pos, keys, values).clone()
        written = [t.clone() for t in keys + values]
        for t, s in zip(keys + values, saved):
            t.copy_(s)
        wrapped = fn.fn(rt.model, ids, pos, keys, values, kv)
    assert torch.equal(direct, wrapped)
    assert all(torch.equal(a, b) for a, b in zip(written, keys + values))
    assert any(not torch.equal(a, b) for a, b in zip(written, saved))  # the step wrote the cache


def test_direct_call_only_where_the_layers_just_forward():
    """plan() refuses a graph input it cannot name, an extra graph output (a mutation epilogue) and a result
    the layers rebuilt (a view)."""
    from gptoss.graph.direct_call import plan
    weight, ids, keys = torch.ones(3), torch.zeros(2), [torch.zeros(4), torch.zeros(4)]
    held = {id(weight): weight}
    out = torch.zeros(2)
    inner = lambda args: [args]  # noqa: E731
    call = plan(inner, [ids, weight, keys[1]], [out], out, (ids, keys), held)
    assert call.template == [None, weight, None] and call.slots == [(0, 0), (2, 2)]
    new_keys = [torch.ones(4), torch.full((4,), 2.0)]
    assert call((ids, new_keys)) == [ids, weight, new_keys[1]]
    assert plan(inner, [ids, torch.ones(3)], [out], out, (ids, keys), held) is None  # an RNG seed, a token
    assert plan(inner, [ids, weight], [out, keys[0]], out, (ids, keys), held) is None  # an epilogue's output
    assert plan(inner, [ids, weight], [out], out[:1], (ids, keys), held) is None  # an output regenerated
    assert plan(inner, [ids, 3], [out], out, (ids, keys), held) is None  # a size


def test_capture_leaves_the_graph_class_as_it_was():
    """capture() swaps CompiledFxGraph.__call__ only for its call: back after an error, and no direct call where no
    compiled graph ran."""
    from torch._inductor.output_code import CompiledFxGraph
    from gptoss.graph.direct_call import capture
    before, model = CompiledFxGraph.__call__, torch.nn.Linear(2, 2)

    def fails():
        raise ValueError("bad input")
    with pytest.raises(ValueError, match="bad input"):
        capture(fails, (), model)
    assert CompiledFxGraph.__call__ is before
    result, direct = capture(lambda: torch.ones(2), (torch.zeros(2),), model)
    assert torch.equal(result, torch.ones(2)) and direct is None
    assert CompiledFxGraph.__call__ is before


def test_second_process_loads_without_compiling(artifacts, checkpoint):
    out, rt = artifacts
    expected = [r.token_ids for r in rt.generate(PROMPTS, max_new_tokens=12)]
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        from torch._inductor import cpp_builder
        from torch._dynamo.utils import counters
        def refuse(self):  # preprocessing a header to hash it is allowed; compiling anything is not
            if not self._preprocessing:
                raise AssertionError("C++ compiler invoked: the artifacts were not reused")
            return original(self)
        original = cpp_builder.CppBuilder.build
        cpp_builder.CppBuilder.build = refuse
        from gptoss.runtime import Runtime
        rt = Runtime.from_pretrained({str(checkpoint)!r}, backend="inductor", artifacts={str(out)!r},
                                     compile_missing=False, progress=False, **{SETTINGS!r})
        tokens = [r.token_ids for r in rt.generate({PROMPTS!r}, max_new_tokens=12)]
        print(json.dumps({{"tokens": tokens, "frames": dict(counters["frames"]),
                          "graphs": dict(counters["stats"]), "loaded": str(rt.graphs.loaded_from)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tokens"] == expected
    assert report["loaded"] == str(out / "tp1-rank0")
    assert report["frames"] == {} and report["graphs"] == {}  # dynamo traced no frame


def test_manifest_is_human_readable(artifacts):
    manifest = json.loads((artifacts[0] / "tp1-rank0" / "manifest.json").read_text())
    assert manifest["key"]["backend"] == "inductor"
    assert manifest["key"]["shapes"]["batch_sizes"] == [1, 4]
    assert manifest["key"]["shapes"]["window_cache"] == "ring" and manifest["key"]["shapes"]["window_slots"] == 23
    assert manifest["key"]["shapes"]["mixed"] is True
    assert sorted(manifest["files"]) == ["decode_b1_t1_kv128", "decode_b4_t1_kv128", "mixed_b1_t16_kv128",
                                         "mixed_b4_t16_kv128", "prefill_b1_t16_kv128", "prefill_b4_t16_kv128"]


def test_refused_for_another_config(artifacts, tmp_path):
    other = make_checkpoint(tmp_path / "other", {"rms_norm_eps": 1e-6}, layout="mxfp4")
    with pytest.raises(ArtifactMismatch, match=r"model_config \(rms_norm_eps\)"):
        Runtime.from_pretrained(other, backend="inductor", artifacts=artifacts[0], progress=False, **SETTINGS)


def test_refused_for_other_shapes(artifacts, checkpoint):
    with pytest.raises(ArtifactMismatch, match="shapes"):
        Runtime.from_pretrained(checkpoint, backend="inductor", artifacts=artifacts[0], progress=False,
                                **(SETTINGS | {"max_seq_len": 256}))


def test_refused_for_the_other_window_cache(artifacts, checkpoint):
    """Graphs built for ring caches are not run on full-length ones; a later process reads the setting back."""
    with pytest.raises(ArtifactMismatch, match="window_cache: artifacts have 'ring', this run needs 'full'"):
        Runtime.from_pretrained(checkpoint, backend="inductor", artifacts=artifacts[0], progress=False,
                                compile_missing=False, window_cache="full", **SETTINGS)
    from gptoss.runtime import Settings
    assert Settings(artifacts=str(artifacts[0])).resolve().window_cache == "ring"


def test_prefill_granule_follows_the_backend(artifacts, checkpoint):
    """Where prompts run eagerly (the eager backend; inductor on CPU, which compiles decode steps only unless
    asked) first and last chunks are not padded (granule 1, smallest chunk 1); compiled prompts keep powers of two
    from 16 unless asked (more graphs); artifacts built without a granule refuse a run that asks for one."""
    from gptoss.runtime import Settings
    eager = Settings(backend="eager").resolve()
    assert (eager.prefill_granule, eager.min_prefill_chunk) == (1, 1)
    cpu = Settings(backend="inductor").resolve()
    assert (cpu.compiled, cpu.prefill_granule, cpu.min_prefill_chunk) == ("decode", 1, 1)
    full = Settings(backend="inductor", compiled="all").resolve()
    assert (full.prefill_granule, full.min_prefill_chunk) == (0, 16)
    assert Settings(artifacts=str(artifacts[0])).resolve().compiled == "all"  # as built, whatever the default
    assert Settings(artifacts=str(artifacts[0])).resolve().prefill_granule == 0
    assert Settings(backend="eager", prefill_granule=0).resolve().prefill_granule == 0
    for bad in (3, -1, True):
        with pytest.raises(ValueError, match="prefill_granule"):
            Settings(prefill_granule=bad)
    with pytest.raises(ArtifactMismatch, match="shapes"):
        Runtime.from_pretrained(checkpoint, backend="inductor", artifacts=artifacts[0], progress=False,
                                compile_missing=False, prefill_granule=16, **SETTINGS)


def test_decode_only_graphs(checkpoint, eager, tmp_path, monkeypatch):
    """compiled="decode": graphs for the decode shapes only, prompts run eagerly (unpadded, as on eager); results
    equal eager's, also served (a newcomer's chunks in eager mixed steps beside compiled decode steps); the
    artifact directory records the choice, and a later runtime loads it without compiling."""
    from gptoss.runtime import Settings
    from gptoss.runtime.scheduler import Request, Scheduler
    # one decode graph (the largest batch is always a bucket: max 2, bucket 2), a row pads
    settings = dict(SETTINGS, max_batch_size=2, batch_sizes=[2], mixed_steps=True, interleave_chunk=8)
    rt = Runtime.from_pretrained(checkpoint, backend="inductor", compiled="decode", artifacts=tmp_path,
                                 progress=False, **settings)
    specs = rt.shapes.specs()
    assert rt.graphs.compiled == sum(s.kind == "decode" for s in specs) == 1
    assert rt.graphs.eager == {s for s in specs if s.kind != "decode"} and rt.graphs.eager
    assert (rt.settings.prefill_granule, rt.settings.min_prefill_chunk) == (1, 1)
    got, want = _step_logits(rt, PROMPTS[:1], 30), _step_logits(eager, PROMPTS[:1], 30)
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    expected = [r.token_ids for r in rt.generate(PROMPTS[:2], max_new_tokens=12)]
    assert expected == [r.token_ids for r in eager.generate(PROMPTS[:2], max_new_tokens=12)]

    scheduler, got_served = Scheduler(rt), {0: [], 1: []}
    mixed_step = scheduler._mixed_step
    mixed = []
    monkeypatch.setattr(scheduler, "_mixed_step", lambda i: mixed.append(i) or mixed_step(i))
    scheduler.submit(Request(tuple(PROMPTS[0]), 30, ignore_eos=True), lambda e: got_served[0].append(e.token_id))
    for _ in range(4):
        scheduler.step()
    scheduler.submit(Request(tuple(PROMPTS[2]), 10, ignore_eos=True), lambda e: got_served[1].append(e.token_id))
    scheduler.run_until_idle()
    assert mixed  # the newcomer's 37-token prompt went in 8-token chunks beside the running row's decode steps
    # a next turn resumes right after what its row holds (prompts run eagerly: any start, off the static grid)
    turn, out = PROMPTS[0] + got_served[0] + [5, 6], []
    scheduler.submit(Request(tuple(turn), 6, ignore_eos=True), lambda e: out.append(e.token_id))
    scheduler.run_until_idle()
    assert scheduler.metrics.prompt_tokens_reused == len(PROMPTS[0]) + 29  # the reply's last token was never fed
    for i, (prompt, n) in enumerate(((PROMPTS[0], 30), (PROMPTS[2], 10))):
        assert got_served[i] == rt.generate([prompt], max_new_tokens=n, ignore_eos=True)[0].token_ids
    assert out == rt.generate([turn], max_new_tokens=6, ignore_eos=True)[0].token_ids
    # generate ran on the scheduler's cache since: the rows hold nothing usable any more
    scheduler.submit(Request(tuple(turn), 6, ignore_eos=True), lambda e: None)
    scheduler.run_until_idle()
    assert scheduler.metrics.prompt_tokens_reused == len(PROMPTS[0]) + 29

    recorded = Settings(artifacts=str(tmp_path)).resolve()
    assert (recorded.backend, recorded.compiled, recorded.prefill_granule) == ("inductor", "decode", 1)
    from torch._inductor import cpp_builder
    original = cpp_builder.CppBuilder.build
    builds = []
    monkeypatch.setattr(cpp_builder.CppBuilder, "build",
                        lambda self: builds.append(1) if not self._preprocessing else original(self))
    again = Runtime.from_pretrained(checkpoint, artifacts=tmp_path, compile_missing=False, progress=False,
                                    **settings)
    assert again.graphs.loaded_from is not None and again.graphs.compiled == rt.graphs.compiled
    assert [r.token_ids for r in again.generate(PROMPTS[:2], max_new_tokens=12)] == expected
    assert builds == []
    with pytest.raises(ArtifactMismatch):  # a full set is another set of graphs
        Runtime.from_pretrained(checkpoint, backend="inductor", compiled="all", artifacts=tmp_path,
                                compile_missing=False, progress=False, **settings)
    with pytest.raises(ValueError, match="inductor option"):
        Settings(backend="eager", compiled="decode").resolve()
    with pytest.raises(ValueError, match="compiled"):
        Settings(compiled="prefill")


def test_refused_for_other_model_code(artifacts, checkpoint, tmp_path):
    import shutil
    copy = tmp_path / "art"
    shutil.copytree(artifacts[0], copy)
    path = copy / "tp1-rank0" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["key"]["code_sha256"] = "0" * 64  # as if built by another version of model/ or graph/
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactMismatch, match="code_sha256"):
        Runtime.from_pretrained(checkpoint, backend="inductor", artifacts=copy, progress=False, **SETTINGS)


def test_missing_graph_file_is_refused(artifacts, checkpoint, tmp_path):
    import shutil
    copy = tmp_path / "art"
    shutil.copytree(artifacts[0], copy)
    (copy / "tp1-rank0" / "inductor" / "decode_b1_t1_kv128.bin").unlink()
    with pytest.raises(ArtifactMismatch, match="incomplete"):
        Runtime.from_pretrained(checkpoint, backend="inductor", artifacts=copy, progress=False, **SETTINGS)


def test_shape_plan_is_bounded():
    plan = ShapePlan(max_batch_size=8, max_seq_len=8192, prefill_chunk=256)
    assert plan.batch_sizes() == [1, 2, 4, 8]
    assert plan.kv_lens() == [128, 256, 512, 1024, 2048, 4096, 8192]
    assert plan.chunk_sizes() == [16, 32, 64, 128, 256]
    assert len(plan.prefill_shapes()) == 5 + 5  # first chunks, then full chunks at each context bucket
    assert plan.kv_len(129) == 256 and plan.kv_len(1) == 128 and plan.kv_len(8192) == 8192
    assert plan.chunk(0, 3) == 16 and plan.chunk(0, 300) == 256
    # a batch-1 prompt's last chunk is cut to what is left (a 300-token prompt: 256 + 64); a batch of several keeps
    # full chunks after the first (their tails differ)
    assert plan.chunk(256, 44) == 64 and plan.chunk(256, 3) == 16 and plan.chunk(256, 3, batch=8) == 256
    # serving with mixed steps: one mixed graph per batch size and kv_len from the chunk's own, in place of the
    # batch-1 interleave prefills
    interleaved = ShapePlan(max_batch_size=8, max_seq_len=8192, prefill_chunk=256, interleave_chunk=64)
    mixed = ShapePlan(max_batch_size=8, max_seq_len=8192, prefill_chunk=256, interleave_chunk=64, mixed=True)
    assert mixed.mixed_kv_lens() == [128, 256, 512, 1024, 2048, 4096, 8192]
    assert [s.kind for s in mixed.specs()].count("mixed") == 4 * 7
    assert "mixed" not in {s.kind for s in interleaved.specs()}
    b1 = lambda shapes: {GraphSpec("prefill", 1, c, kv) for c, kv in shapes}  # noqa: E731
    # mixed plans drop the batch-1 prefills that start inside a full chunk (those prompts are on the staging row)
    interleave_only = (b1(interleaved.interleave_shapes()) | b1(interleaved.tail_shapes())) - \
        b1(interleaved.prefill_shapes()) - b1(mixed.tail_shapes())
    assert interleave_only and {s for s in mixed.specs() if s.kind != "mixed"} == \
        set(interleaved.specs()) - interleave_only
    assert ShapePlan.from_record(mixed.to_record()).specs() == mixed.specs()
    # a granule: first and last chunks round up to a multiple of it (300 tokens: 256 + 48, not 256 + 64)
    fine = ShapePlan(max_batch_size=8, max_seq_len=8192, prefill_chunk=256, granule=16)
    assert fine.chunk_sizes() == list(range(16, 257, 16))
    assert fine.chunk(256, 44) == 48 and fine.chunk(0, 3) == 16 and fine.chunk(0, 100) == 112
    assert fine.chunk(256, 44, batch=8) == 256 and fine.chunk(0, 300) == 256
    assert ShapePlan.from_record(fine.to_record()).specs() == fine.specs() and "granule" not in plan.to_record()
    for bad in (3, 512, -16):
        with pytest.raises(ValueError, match="granule"):
            ShapePlan(max_batch_size=8, max_seq_len=8192, prefill_chunk=256, granule=bad)


def test_whole_cache_plans_one_kv_len():
    """kv_buckets=False (CPU fp32, whose attention kernels skip the slots a query does not see): every step reads
    the whole cache, so a graph per batch and chunk, not per kv_len as well; the manifest records it."""
    bucketed = ShapePlan(max_batch_size=8, max_seq_len=4096, prefill_chunk=256, window=128)
    whole = ShapePlan(max_batch_size=8, max_seq_len=4096, prefill_chunk=256, window=128, kv_buckets=False)
    assert whole.kv_lens() == [4096] and whole.kv_len(1) == whole.kv_len(4096) == 4096
    kinds = lambda plan: [s.kind for s in plan.specs()]  # noqa: E731
    assert kinds(bucketed).count("decode") == 4 * 6 and kinds(whole).count("decode") == 4
    assert (len(bucketed.specs()), len(whole.specs())) == (76, 24)  # the serving defaults: 8 rows, 4,096 slots
    assert {s.kv_len for s in whole.specs()} == {4096}
    assert ShapePlan.from_record(whole.to_record()).specs() == whole.specs()
    assert "kv_buckets" not in bucketed.to_record()  # graph sets built before the setting read as bucketed
    assert ShapePlan.from_record(bucketed.to_record()).kv_buckets


def test_kv_buckets_follow_the_attention_kernels(checkpoint):
    """The default: off where attention runs on the CPU kernels (fp32 on CPU), on elsewhere (bf16 CPU attention
    costs every slot it reads); either way the same tokens and, to rounding, the same logits across kv_lens."""
    from gptoss.runtime import Settings
    assert Settings(backend="eager").resolve().kv_buckets is False
    assert Settings(backend="inductor").resolve().kv_buckets is False
    assert Settings(backend="eager", dtype="bfloat16").resolve().kv_buckets is True
    assert Settings(backend="eager", kv_buckets=True).resolve().kv_buckets is True
    with pytest.raises(ValueError, match="kv_buckets"):
        Settings(kv_buckets="no")
    prompts = [list(range(3, 140)), [5, 6, 7]]  # the first row's context crosses 128 and 256 slots
    settings = dict(max_batch_size=2, max_seq_len=512, prefill_chunk=64)
    runs = [Runtime.from_pretrained(checkpoint, kv_buckets=b, **settings) for b in (True, False)]
    assert runs[0].shapes.kv_lens() == [128, 256, 512] and runs[1].shapes.kv_lens() == [512]
    out = [rt.generate(prompts, max_new_tokens=130, ignore_eos=True, logprobs=0) for rt in runs]
    assert [r.token_ids for r in out[0]] == [r.token_ids for r in out[1]]
    for a, b in zip(*out):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("interleave, mixed, granule", [(None, False, 0), (64, False, 0), (64, True, 0),
                                                        (16, False, 0), (None, False, 16), (64, True, 16),
                                                        (64, False, 32)])
def test_every_chunk_is_planned_and_in_the_cache(interleave, mixed, granule):
    """Whatever the path a prompt's chunks take (alone, interleaved, switching between them, a batch), each chunk
    lies inside one whole prefill chunk of positions (a ring, a whole number of them, never sees one wrap) and
    starts at a multiple of its own length unless a granule cut it, ends inside the cache's slots, and has a graph
    in the plan."""
    plan = ShapePlan(max_batch_size=4, max_seq_len=1000, prefill_chunk=256, interleave_chunk=interleave,
                     mixed=mixed, window=128, granule=granule)
    planned = {(s.batch, s.steps, s.kv_len) for s in plan.specs() if s.kind == "prefill"}

    def placed(done, c):
        aligned = done % c == 0 or (granule and c % granule == 0)
        return aligned and done // 256 == (done + c - 1) // 256 and done + c <= plan.slots
    for length in list(range(1, 600, 7)) + [255, 256, 257, 511, 512, 513, 999]:
        for pattern in ("alone", "interleaved", "switching", "batch"):
            done = step = 0
            staged = False
            while done < length:
                interleaved = pattern == "interleaved" or (pattern == "switching" and step % 2 == 1)
                batch = 4 if pattern == "batch" else 1
                if mixed and batch == 1:  # the scheduler's rule (Scheduler._mixes): whole interleave chunks
                    c = plan.chunk(done, length - done, interleaved=True)
                    if c == plan.interleave_chunk and (staged or interleaved):
                        assert placed(done, c)
                        assert plan.kv_len(done + c) in plan.mixed_kv_lens(), (length, pattern, done)
                        done, step, staged = done + c, step + 1, True
                        continue
                c = plan.chunk(done, length - done, interleaved=interleaved and batch == 1, batch=batch)
                assert placed(done, c), (length, pattern, done, c)
                assert (batch, c, plan.kv_len(done + c)) in planned, (length, pattern, done, c)
                done, step = done + c, step + 1


def test_served_through_scheduler_equals_generate(artifacts, monkeypatch):
    """The server on the compiled graphs: a newcomer's prompt is prefilled while other rows decode, by a batch-1
    graph on its own row of the cache (a view at a storage offset) or in mixed steps on the staging row; greedy
    outputs equal `Runtime.generate` one request at a time, and nothing is traced or compiled while serving."""
    import asyncio

    import httpx

    from gptoss.runtime.scheduler import Request, Scheduler
    from gptoss.runtime.server import create_app
    from gptoss.runtime.server.background import LiveServer
    from gptoss.runtime.server.local_engine import LocalEngine

    rt = artifacts[1]
    prompts = PROMPTS + [list(range(40, 73)), [3, 1, 4, 1, 5, 9, 2, 6]]
    lengths = [9, 30, 4, 17, 25, 12]
    want = [rt.generate([p], max_new_tokens=n, ignore_eos=True)[0] for p, n in zip(prompts, lengths)]

    scheduler = Scheduler(rt)
    scheduler.submit(Request(tuple(PROMPTS[0]), 3))  # warm-up, in this thread
    scheduler.run_until_idle()
    builds = []
    from torch._inductor import cpp_builder
    original = cpp_builder.CppBuilder.build
    monkeypatch.setattr(cpp_builder.CppBuilder, "build", lambda self: builds.append(1) or original(self))
    before = json.dumps(counters, sort_keys=True, default=str)
    rows_prefilled = set()
    prefill_chunk = scheduler._prefill_chunk
    monkeypatch.setattr(scheduler, "_prefill_chunk", lambda i: rows_prefilled.add(i) or prefill_chunk(i))
    rows_mixed = set()
    mixed_step = scheduler._mixed_step
    monkeypatch.setattr(scheduler, "_mixed_step", lambda i: rows_mixed.add(i) or mixed_step(i))
    # one row at a time even for the first burst: every row's view is exercised (the batched burst is tested below)
    monkeypatch.setattr(scheduler, "_prefill_together", lambda *args: None)

    async def clients(url):
        async with httpx.AsyncClient(timeout=300) as client:
            async def one(p, n):
                r = await client.post(url + "/v1/completions", json={"model": "m", "prompt": p, "max_tokens": n,
                                                                       "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["text"]

            async def start_when_queued():  # every request waits first: four are admitted together
                while scheduler.metrics.queue_depth < len(prompts):
                    await asyncio.sleep(0.01)
                scheduler.start()
            return (await asyncio.gather(start_when_queued(), *(one(p, n) for p, n in zip(prompts, lengths))))[1:]

    try:
        with LiveServer(create_app(LocalEngine(scheduler), "m")) as server:
            got = asyncio.run(clients(server.url))
    finally:
        scheduler.stop()
    assert got == [(len(w.token_ids), w.text) for w in want]
    assert rows_prefilled | rows_mixed == {0, 1, 2, 3}  # every row's view (and the staging row's) got a prompt
    assert rows_prefilled and rows_mixed
    assert builds == []
    assert json.dumps(counters, sort_keys=True, default=str) == before


def test_prefix_reuse_on_compiled_graphs(artifacts, monkeypatch):
    """Prompts resumed after the tokens a row still holds run only the set's graphs (they start at a multiple of
    the prefill chunk here: mixed steps), live and with the rings' saved window put back; outputs equal
    `Runtime.generate` of the whole prompt, nothing is built or traced."""
    from gptoss.runtime.scheduler import Request, Scheduler

    rt = artifacts[1]
    assert rt.shapes.mixed and not rt.graphs.python_kinds
    first = Request(tuple(PROMPTS[2]), 12, ignore_eos=True)
    reply = rt.generate([PROMPTS[2]], max_new_tokens=12, ignore_eos=True)[0].token_ids
    turn = Request(tuple(PROMPTS[2] + reply + [5, 6, 7]), 30, ignore_eos=True)
    want = rt.generate([list(turn.prompt)], max_new_tokens=30, ignore_eos=True)[0].token_ids
    builds = []
    from torch._inductor import cpp_builder
    original = cpp_builder.CppBuilder.build
    monkeypatch.setattr(cpp_builder.CppBuilder, "build", lambda self: builds.append(1) or original(self))
    before = json.dumps(counters, sort_keys=True, default=str)
    scheduler = Scheduler(rt)
    assert scheduler.reuse.align == rt.shapes.prefill_chunk == 16
    got = []
    for request, reused in ((first, 0), (turn, 48), (turn, 48)):  # live (48 of 48 + 3), then restored
        out, start = [], scheduler.metrics.prompt_tokens_reused
        scheduler.submit(request, lambda e, out=out: out.append(e.token_id))
        scheduler.run_until_idle()
        assert scheduler.metrics.prompt_tokens_reused - start == reused
        got.append(out)
    assert got == [reply, want, want]
    assert builds == [] and json.dumps(counters, sort_keys=True, default=str) == before


def test_burst_prefill_on_compiled_graphs(artifacts, monkeypatch):
    """A burst of newcomers shares the batch-4 prefill graph (the scheduler's batched path) on the compiled
    graphs: outputs equal `Runtime.generate` one request at a time, nothing is built or traced."""
    from gptoss.runtime.scheduler import Request, Scheduler

    rt = artifacts[1]
    want = [rt.generate([p], max_new_tokens=6, ignore_eos=True)[0].token_ids for p in PROMPTS]
    builds = []
    from torch._inductor import cpp_builder
    original = cpp_builder.CppBuilder.build
    monkeypatch.setattr(cpp_builder.CppBuilder, "build", lambda self: builds.append(1) or original(self))
    before = json.dumps(counters, sort_keys=True, default=str)
    scheduler = Scheduler(rt)
    scheduler.record_graph_calls = True
    got: dict[int, list[int]] = {}
    for i, p in enumerate(PROMPTS):
        scheduler.submit(Request(tuple(p), 6, ignore_eos=True), lambda e, i=i: got.setdefault(i, []).append(e.token_id))
    scheduler.run_until_idle()
    assert scheduler.graph_calls[0][:2] == ("prefill", 4)
    assert [got[i] for i in range(len(PROMPTS))] == want
    assert builds == [] and json.dumps(counters, sort_keys=True, default=str) == before


def test_artifact_directory_holds_the_isa_probes(tmp_path):
    """A process loading artifacts probes the compiler's instruction sets in the artifact directory; the compiling
    process leaves those probes there even when it had probed elsewhere first, so loading never runs the compiler."""
    from gptoss.graph.inductor import _probe_isas_like_a_new_process

    _probe_isas_like_a_new_process(tmp_path)
    script = textwrap.dedent("""
        from torch._inductor import cpp_builder
        def refuse(self):
            raise AssertionError("C++ compiler invoked: " + self.get_target_file_path())
        cpp_builder.CppBuilder.build = refuse
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        print(pick_vec_isa())
    """)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() != "INVALID_VEC_ISA"
