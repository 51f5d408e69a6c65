"""The small per-layer ops of an eager step as single CPU calls (model/kernels: rms_norm, add_rms_norm, rope,
cache_write) against the torch forms they replace (model/ops/torch_ops), which compiled graphs keep."""
import pytest
import torch

from gptoss.model import kernels


def norm_by_ops(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_by_ops(x, cos, sin):
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def cache_write_by_ops(cache, start, new):
    batch, steps = new.shape[:2]
    rows = torch.arange(batch)[:, None].expand(batch, steps)
    cols = torch.remainder(start[:, None].long() + torch.arange(steps), cache.shape[1])
    cache.index_put_((rows, cols), new)


@pytest.mark.parametrize("shape", [(1, 768), (8, 2880), (3, 5, 100), (300, 64), (2, 7)])
def test_rms_norm_matches_the_torch_form(shape):
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), norm_by_ops(x, weight, 1e-5), rtol=2e-6,
                               atol=2e-6)
    residual = torch.randn(shape, generator=g)
    y, summed = kernels.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, x + residual)  # one rounding, as torch's add
    torch.testing.assert_close(y, norm_by_ops(x + residual, weight, 1e-5), rtol=2e-6, atol=2e-6)


def test_norm_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(1)
    x, residual, weight = torch.randn(40, 768, generator=g), torch.randn(40, 768, generator=g), torch.randn(768)
    alone = torch.cat([kernels.add_rms_norm(x[i:i + 1], residual[i:i + 1], weight, 1e-5)[0] for i in range(40)])
    assert torch.equal(kernels.add_rms_norm(x, residual, weight, 1e-5)[0], alone)  # 40 rows: split over threads
    assert torch.equal(kernels.rms_norm(x, weight, 1e-5)[5], kernels.rms_norm(x[5:6], weight, 1e-5)[0])


@pytest.mark.parametrize("batch, steps", [(1, 1), (8, 1), (2, 37)])
def test_rope_equals_the_torch_form_on_views_of_the_fused_projection(batch, steps):
    """q and k are views of one qkv row (strided rows): read in place, rounded exactly as the torch form."""
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(batch, steps, (16 + 2 * 2) * 64, generator=g)
    q, k, _ = qkv.split([16 * 64, 2 * 64, 2 * 64], dim=-1)
    q, k = q.reshape(batch, steps, 16, 64), k.reshape(batch, steps, 2, 64)
    cos, sin = torch.randn(batch, steps, 32, generator=g), torch.randn(batch, steps, 32, generator=g)
    for x in (q, k, q.contiguous(), q.transpose(2, 3).contiguous().transpose(2, 3)):
        got = kernels.rope(x, cos, sin)
        assert got.is_contiguous() and torch.equal(got, rope_by_ops(x, cos, sin))


def test_cache_write_equals_the_torch_form_across_the_ring():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, 6, 3 * 128, generator=g)
    v = qkv[..., 256:].reshape(4, 6, 2, 64)  # strided rows, as the value view of qkv
    start = torch.tensor([0, 14, 15, 33])  # rows 1-3 wrap the 16-slot ring (row 3 more than once around)
    got, want = torch.randn(4, 16, 2, 64, generator=g), None
    want = got.clone()
    kernels.cache_write(got, start, v)
    cache_write_by_ops(want, start, v)
    assert torch.equal(got, want)


def test_bad_inputs_are_refused_with_the_problem_named():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="does not end in the weight"):
        kernels.rms_norm(x, torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.rms_norm(x.double(), torch.ones(8).double(), 1e-5)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        kernels.rope(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3), torch.randn(1, 2, 3))
    with pytest.raises(RuntimeError, match="negative"):
        kernels.cache_write(torch.zeros(1, 4, 1, 8), torch.tensor([-1]), torch.randn(1, 1, 1, 8))
    with pytest.raises(RuntimeError, match="S > 0"):
        kernels.cache_write(torch.zeros(1, 0, 1, 8), torch.tensor([0]), torch.randn(1, 1, 1, 8))
    with pytest.raises(RuntimeError, match=r"values must be \[B, T, H, D\]"):
        kernels.cache_write(torch.zeros(1, 4, 1, 8), torch.tensor([0]), torch.randn(8))
    with pytest.raises(RuntimeError, match="do not fit the cache"):
        kernels.cache_write(torch.zeros(1, 4, 1, 8), torch.tensor([0]), torch.randn(1, 1, 2, 8))


def test_the_op_table_takes_them_eagerly_and_compiled_graphs_keep_the_torch_forms(monkeypatch):
    """Eagerly on fp32 CPU tensors the op table makes one call each; under torch.compile it traces the torch forms
    (no gptoss:: call in the graph), which the compiler fuses."""
    from gptoss.model.ops import torch_ops
    x, residual, weight = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    calls = []
    monkeypatch.setattr(kernels, "add_rms_norm", lambda *args: calls.append(args) or torch.ops.gptoss.add_rms_norm(
        *args))
    eager = torch_ops.add_rms_norm(x, residual, weight, 1e-5)
    assert len(calls) == 1
    torch_ops.add_rms_norm(x.double(), residual.double(), weight.double(), 1e-5)  # not fp32: the torch form
    assert len(calls) == 1

    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(lambda a, b: torch_ops.add_rms_norm(a, b, weight, 1e-5), backend=backend)
    y, summed = compiled(x, residual)
    assert seen and not any("gptoss" in name for name in seen) and len(calls) == 1
    torch.testing.assert_close(y, eager[0], rtol=2e-6, atol=2e-6)
    assert torch.equal(summed, eager[1])
