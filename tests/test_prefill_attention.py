"""Attention over chunks of several tokens on CPU against the op-by-op attention (torch_ops.attention_by_ops):
the project's kernel (kernels.prefill_attention, fp32, on every instruction-set path this CPU runs) and ATen's
fused kernel (torch_ops.attention_flash_cpu, the sink joined through each row's log-sum-exp; other dtypes).
Chunks at any position, ring caches that wrapped, sliding windows, grouped heads, rows at different positions,
slots never written."""
import pytest
import torch

from gptoss.model import kernels
from gptoss.model.ops import torch_ops


def _case(batch, steps, slots, kv_heads, group, dim, starts, kv_len, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, steps, kv_heads * group, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, slots, kv_heads, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, slots, kv_heads, dim, generator=g, dtype=dtype)
    sinks = torch.randn(kv_heads * group, generator=g, dtype=dtype) * 3
    q_pos = torch.tensor(starts)[:, None] + torch.arange(steps)
    k_pos = torch_ops.slot_positions(q_pos, kv_len, slots)
    return q, k, v, sinks, q_pos, k_pos


CASES = [  # batch, steps, slots, kv_heads, group, dim, starts, kv_len, window
    (1, 64, 256, 2, 8, 64, [0], 256, 0),            # gpt-oss heads, a first chunk: most slots not yet written
    (1, 64, 256, 2, 8, 64, [128], 256, 128),        # a later chunk under a sliding window
    (3, 5, 40, 1, 3, 20, [0, 17, 35], 40, 0),        # odd sizes, rows at different positions
    (2, 16, 48, 2, 2, 64, [40, 130], 48, 16),        # window ring: the second row's wrapped
    (2, 7, 300, 4, 4, 9, [200, 3], 128, 0),          # reads only the first kv_len slots of a longer cache
    (1, 33, 700, 2, 8, 64, [600], 700, 300),         # many key blocks, a window spanning them
]
KERNEL_CASES = CASES + [
    (1, 2, 100, 1, 100, 16, [50], 100, 0),           # a group wider than a tile's rows: two tiles of heads
    (2, 130, 300, 3, 1, 8, [0, 100], 300, 0),        # one head per kv head: tiles of positions only
    (1, 3, 90, 2, 5, 72, [87], 90, 0),               # rows padding part of a vector
    (1, 300, 700, 2, 8, 64, [300], 700, 64),         # causal and window blocks seen in part, in whole and not at all
]


@pytest.mark.parametrize("batch,steps,slots,kv_heads,group,dim,starts,kv_len,window", KERNEL_CASES)
def test_the_kernel_matches_the_op_by_op_attention(isa, batch, steps, slots, kv_heads, group, dim, starts, kv_len,
                                                   window):
    q, k, v, sinks, q_pos, k_pos = _case(batch, steps, slots, kv_heads, group, dim, starts, kv_len)
    want = torch_ops.attention_by_ops(q, k, v, sinks, q_pos, window, dim ** -0.5, k_pos)
    got = kernels.prefill_attention(q.float(), k.float(), v.float(), sinks.float(), k_pos, q_pos, window,
                                    dim ** -0.5)
    assert got.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


def test_the_kernel_gives_a_row_the_same_bits_whatever_else_it_computes(isa):
    """A row's result depends on its own inputs alone: not on the rows beside it in its tile (a sub-range of the
    chunk, another batch row), the cache length the step reads, or the thread count."""
    q, k, v, sinks, q_pos, k_pos = [t.float() if t.is_floating_point() else t
                                    for t in _case(2, 70, 400, 2, 8, 64, [250, 310], 400)]
    whole = kernels.prefill_attention(q, k, v, sinks, k_pos, q_pos, 128, 0.125)
    part = kernels.prefill_attention(q[1:, 9:30], k[1:], v[1:], sinks, k_pos[1:], q_pos[1:, 9:30], 128, 0.125)
    assert torch.equal(part, whole[1:, 9:30])
    longer = torch_ops.slot_positions(q_pos[:1], 400, 400)[:, :330]  # row 0 ends at 319: slots past 330 unseen
    assert torch.equal(kernels.prefill_attention(q[:1], k[:1], v[:1], sinks, longer, q_pos[:1], 128, 0.125),
                       whole[:1])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.prefill_attention(q, k, v, sinks, k_pos, q_pos, 128, 0.125), whole)
    finally:
        torch.set_num_threads(before)


def test_the_kernel_refuses_bad_inputs_with_the_problem_named():
    q, k, v, sinks, q_pos, k_pos = [t.float() if t.is_floating_point() else t
                                    for t in _case(1, 4, 16, 2, 2, 8, [5], 16)]
    with pytest.raises(RuntimeError, match="must be float32"):
        kernels.prefill_attention(q.double(), k, v, sinks, k_pos, q_pos, 0, 1.0)
    with pytest.raises(RuntimeError, match="does not match the caches"):
        kernels.prefill_attention(q[..., :4], k, v, sinks, k_pos, q_pos, 0, 1.0)
    with pytest.raises(RuntimeError, match="q_pos must be"):
        kernels.prefill_attention(q, k, v, sinks, k_pos, q_pos[:, :2], 0, 1.0)
    with pytest.raises(RuntimeError, match="below 2\\^24"):
        kernels.prefill_attention(q, k, v, sinks, k_pos, q_pos + 2 ** 24, 0, 1.0)


@pytest.mark.parametrize("batch,steps,slots,kv_heads,group,dim,starts,kv_len,window", CASES)
def test_aten_matches_the_op_by_op_attention(batch, steps, slots, kv_heads, group, dim, starts, kv_len, window):
    q, k, v, sinks, q_pos, k_pos = _case(batch, steps, slots, kv_heads, group, dim, starts, kv_len)
    got = torch_ops.attention_flash_cpu(q, k, v, sinks, q_pos, window, dim ** -0.5, k_pos)
    want = torch_ops.attention_by_ops(q, k, v, sinks, q_pos, window, dim ** -0.5, k_pos)
    assert got.shape == q.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # in fp32, as the model runs
    got32 = torch_ops.attention_flash_cpu(q.float(), k.float(), v.float(), sinks.float(), q_pos, window,
                                          dim ** -0.5, k_pos)
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=2e-6)


def test_a_row_that_sees_no_key_gives_zeros_as_the_sink_alone_would(isa):
    q, k, v, sinks, q_pos, k_pos = _case(1, 4, 16, 2, 2, 8, [5], 16)
    k_pos = torch.full_like(k_pos, -1)  # nothing written
    got = torch_ops.attention_flash_cpu(q, k, v, sinks, q_pos, 0, 0.3, k_pos)
    assert torch.equal(got, torch.zeros_like(got))
    assert torch.equal(torch_ops.attention_by_ops(q, k, v, sinks, q_pos, 0, 0.3, k_pos), got)
    got32 = kernels.prefill_attention(q.float(), k.float(), v.float(), sinks.float(), k_pos, q_pos, 0, 0.3)
    assert torch.equal(got32, torch.zeros_like(got32))


def test_bf16_activations():
    q, k, v, sinks, q_pos, k_pos = _case(2, 24, 64, 2, 4, 64, [10, 40], 64)
    want = torch_ops.attention_by_ops(q, k, v, sinks, q_pos, 32, 0.125, k_pos)
    got = torch_ops.attention_flash_cpu(q.bfloat16(), k.bfloat16(), v.bfloat16(), sinks.bfloat16(), q_pos, 32,
                                        0.125, k_pos)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)


def test_the_op_table_runs_the_kernel_for_fp32_chunks_and_aten_for_other_dtypes(monkeypatch):
    calls = []
    monkeypatch.setattr(torch_ops, "attention_flash_cpu",
                        lambda *a: calls.append("aten") or torch_ops.attention_by_ops(*a))
    monkeypatch.setattr(torch_ops, "prefill_attention",
                        lambda *a: calls.append("kernel") or kernels.prefill_attention(*a))
    q, k, v, sinks, q_pos, _ = _case(1, 3, 32, 2, 4, 64, [20], 32, dtype=torch.float32)
    torch_ops.attention(q[:, :1], k, v, sinks, q_pos[:, :1], 0, 0.125, 32)  # one token: the decode kernel
    torch_ops.attention(q, k, v, sinks, q_pos, 0, 0.125, 32)
    torch_ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), sinks.bfloat16(), q_pos, 0, 0.125, 32)
    assert calls == ["kernel", "aten"]
