"""Attention over chunks of several tokens on CPU (torch_ops.attention_flash_cpu: ATen's fused kernel, the sink
joined through each row's log-sum-exp) against the op-by-op attention (torch_ops.attention_by_ops): chunks at
any position, ring caches that wrapped, sliding windows, grouped heads, rows at different positions, slots never
written."""
import pytest
import torch

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


@pytest.mark.parametrize("batch,steps,slots,kv_heads,group,dim,starts,kv_len,window", [
    (1, 64, 256, 2, 8, 64, [0], 256, 0),            # gpt-oss heads, a first chunk: most slots not yet written
    (1, 64, 256, 2, 8, 64, [128], 256, 128),        # a later chunk under a sliding window
    (3, 5, 40, 1, 3, 20, [0, 17, 35], 40, 0),        # odd sizes, rows at different positions
    (2, 16, 48, 2, 2, 64, [40, 130], 48, 16),        # window ring: the second row's wrapped
    (2, 7, 300, 4, 4, 9, [200, 3], 128, 0),          # reads only the first kv_len slots of a longer cache
    (1, 33, 700, 2, 8, 64, [600], 700, 300),         # many key blocks, a window spanning them
])
def test_matches_the_op_by_op_attention(batch, steps, slots, kv_heads, group, dim, starts, kv_len, window):
    q, k, v, sinks, q_pos, k_pos = _case(batch, steps, slots, kv_heads, group, dim, starts, kv_len)
    got = torch_ops.attention_flash_cpu(q, k, v, sinks, q_pos, window, dim ** -0.5, k_pos)
    want = torch_ops.attention_by_ops(q, k, v, sinks, q_pos, window, dim ** -0.5, k_pos)
    assert got.shape == q.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # in fp32, as the model runs
    got32 = torch_ops.attention_flash_cpu(q.float(), k.float(), v.float(), sinks.float(), q_pos, window,
                                          dim ** -0.5, k_pos)
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=2e-6)


def test_a_row_that_sees_no_key_gives_zeros_as_the_sink_alone_would():
    q, k, v, sinks, q_pos, k_pos = _case(1, 4, 16, 2, 2, 8, [5], 16)
    k_pos = torch.full_like(k_pos, -1)  # nothing written
    got = torch_ops.attention_flash_cpu(q, k, v, sinks, q_pos, 0, 0.3, k_pos)
    assert torch.equal(got, torch.zeros_like(got))
    assert torch.equal(torch_ops.attention_by_ops(q, k, v, sinks, q_pos, 0, 0.3, k_pos), got)


def test_bf16_activations():
    q, k, v, sinks, q_pos, k_pos = _case(2, 24, 64, 2, 4, 64, [10, 40], 64)
    want = torch_ops.attention_by_ops(q, k, v, sinks, q_pos, 32, 0.125, k_pos)
    got = torch_ops.attention_flash_cpu(q.bfloat16(), k.bfloat16(), v.bfloat16(), sinks.bfloat16(), q_pos, 32,
                                        0.125, k_pos)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)


def test_the_op_table_runs_it_for_chunks_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch_ops, "attention_flash_cpu",
                        lambda *a: calls.append(a) or torch_ops.attention_by_ops(*a))
    q, k, v, sinks, q_pos, _ = _case(1, 3, 32, 2, 4, 64, [20], 32, dtype=torch.float32)
    torch_ops.attention(q[:, :1], k, v, sinks, q_pos[:, :1], 0, 0.125, 32)  # one token: the decode kernel
    torch_ops.attention(q, k, v, sinks, q_pos, 0, 0.125, 32)
    assert len(calls) == 1
