"""The CPU decode-attention kernel (kernels.decode_attention) against the op-by-op attention it replaces
(torch_ops.attention_by_ops), on every instruction-set path this CPU runs: ring caches that wrapped, sliding
windows, grouped heads, odd head sizes, rows at different positions, slots never written."""
import pytest
import torch

from gptoss.model import kernels
from gptoss.model.ops import torch_ops


def _case(batch, slots, kv_heads, group, dim, positions, kv_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, kv_heads * group, dim, generator=g)
    k = torch.randn(batch, slots, kv_heads, dim, generator=g)
    v = torch.randn(batch, slots, kv_heads, dim, generator=g)
    sinks = torch.randn(kv_heads * group, generator=g)
    q_pos = torch.tensor(positions)[:, None]
    k_pos = torch_ops.slot_positions(q_pos, kv_len, slots)
    return q, k, v, sinks, q_pos, k_pos


@pytest.mark.parametrize("batch,slots,kv_heads,group,dim,positions,kv_len,window", [
    (1, 64, 2, 8, 64, [40], 64, 0),          # gpt-oss head size, part of the cache written
    (3, 50, 1, 3, 20, [0, 17, 49], 50, 0),    # odd sizes; a row that sees only its first slot
    (2, 40, 2, 2, 64, [39, 130], 40, 16),      # sliding window; the second row's ring wrapped three times
    (2, 300, 4, 4, 9, [299, 5], 128, 0),      # reads only the first kv_len slots of a longer cache
    (1, 24, 3, 1, 64, [100], 24, 24),         # one head per kv head; a full ring exactly a window long
    (2, 33, 2, 3, 72, [32, 10], 33, 0),       # a head of 64 + 8 values
    (1, 16, 1, 4, 8, [9], 16, 4),             # a head of 8
    (2, 700, 2, 8, 64, [650, 699], 700, 0),   # many chunks of visible slots, merged
    (1, 700, 3, 2, 64, [690], 700, 300),      # a window spanning chunks
    (2, 200, 1, 16, 80, [150, 199], 200, 0),  # two sets of eight heads, a head of 5 x 16 values (AVX-512's loops)
])
def test_matches_the_op_by_op_attention(isa, batch, slots, kv_heads, group, dim, positions, kv_len, window):
    q, k, v, sinks, q_pos, k_pos = _case(batch, slots, kv_heads, group, dim, positions, kv_len)
    got = kernels.decode_attention(q, k, v, sinks, k_pos, q_pos, window, dim ** -0.5)
    want = torch_ops.attention_by_ops(q.double(), k.double(), v.double(), sinks.double(), q_pos, window,
                                      dim ** -0.5, k_pos)
    assert got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


def test_the_op_table_runs_it_for_single_token_steps_only(isa, monkeypatch):
    calls = []
    monkeypatch.setattr(torch_ops, "decode_attention", lambda *a: calls.append(a) or kernels.decode_attention(*a))
    q, k, v, sinks, q_pos, _ = _case(1, 32, 2, 4, 64, [20], 32)
    torch_ops.attention(q, k, v, sinks, q_pos, 0, 0.125, 32)
    torch_ops.attention(q.expand(1, 3, 8, 64), k, v, sinks, q_pos + torch.arange(3), 0, 0.125, 32)
    assert len(calls) == 1


def test_a_row_does_not_depend_on_the_batch_or_the_cache_length(isa):
    q, k, v, sinks, q_pos, k_pos = _case(4, 128, 2, 8, 64, [3, 60, 127, 90], 128)
    whole = kernels.decode_attention(q, k, v, sinks, k_pos, q_pos, 0, 0.125)
    for row in range(4):
        alone = kernels.decode_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], sinks, k_pos[row:row + 1],
                                         q_pos[row:row + 1], 0, 0.125)
        assert torch.equal(alone, whole[row:row + 1])
    short = torch_ops.slot_positions(q_pos[:1], 64, 128)  # row 0 (position 3) read through a shorter kv_len
    assert torch.equal(kernels.decode_attention(q[:1], k[:1], v[:1], sinks, short, q_pos[:1], 0, 0.125), whole[:1])


def test_the_result_does_not_depend_on_the_thread_count(isa):
    q, k, v, sinks, q_pos, k_pos = _case(1, 1000, 8, 8, 64, [999], 1000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.decode_attention(q, k, v, sinks, k_pos, q_pos, 0, 0.125)
        torch.set_num_threads(2)
        assert torch.equal(kernels.decode_attention(q, k, v, sinks, k_pos, q_pos, 0, 0.125), one)
    finally:
        torch.set_num_threads(before)


def test_bad_inputs_are_refused_with_the_problem_named():
    q, k, v, sinks, q_pos, k_pos = _case(1, 16, 2, 2, 8, [5], 16)
    with pytest.raises(RuntimeError, match="must be float32"):
        kernels.decode_attention(q.double(), k, v, sinks, k_pos, q_pos, 0, 1.0)
    with pytest.raises(RuntimeError, match="does not match the caches"):
        kernels.decode_attention(q[..., :4], k, v, sinks, k_pos, q_pos, 0, 1.0)
    with pytest.raises(RuntimeError, match="k_pos must be"):
        kernels.decode_attention(q, k, v, sinks, torch.zeros(1, 17, dtype=torch.long), q_pos, 0, 1.0)
    with pytest.raises(RuntimeError, match="sinks"):
        kernels.decode_attention(q, k, v, sinks[:3], k_pos, q_pos, 0, 1.0)


def test_slot_positions_are_the_latest_position_each_slot_holds():
    """Every slot of rings and linear caches, before and after they wrap: the largest p <= the step's end with
    p = slot (mod slots) (negative: not written yet)."""
    for slots in (1, 7, 23, 128):
        ends = [0, 1, slots - 1, slots, slots + 5, 3 * slots + 2, 1000]
        q_pos = torch.tensor(ends)[:, None]
        for kv_len in (slots, max(1, slots // 2), 4 * slots):
            got = torch_ops.slot_positions(q_pos, kv_len, slots)
            want = [[max(p for p in range(-slots, end + 1) if p % slots == s) for s in range(min(kv_len, slots))]
                    for end in ends]
            assert got.tolist() == want, (slots, kv_len)
