"""Greedy choice through numpy on CPU (torch's CPU argmax is not vectorised) picks what torch.argmax picks."""
import pytest
import torch

from gptoss.runtime.sampling import draw, greedy, sample


def test_greedy_equals_torch_argmax_with_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (6, 1000), generator=g).float()  # many ties: the first maximum wins
    logits[2, 17] = float("nan")  # NaN counts as the maximum, as in torch.argmax
    logits[3] = float("-inf")
    got = greedy(logits)
    assert got.dtype == torch.int64 and got.tolist() == logits.argmax(dim=-1).tolist()
    assert sample(logits, 0.0, None, None, None).tolist() == got.tolist()


def test_greedy_other_dtypes_and_views():
    x = torch.randn(3, 257)
    assert greedy(x.bfloat16()).tolist() == x.bfloat16().argmax(-1).tolist()  # torch's path
    assert greedy(x[:, ::2]).tolist() == x[:, ::2].argmax(-1).tolist()  # a strided view
    assert greedy(x[1:2]).tolist() == [int(x[1].argmax())]


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    """Inverse-CDF draws: each index's frequency within 5 standard deviations of its probability over 40,000
    draws; zero-probability indices (first, middle, last) never come up; a seeded generator repeats itself."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.25, 0.05, 0.6, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 40_000
    got = torch.cat([draw(probs.expand(100, -1), g) for _ in range(n // 100)])
    counts = torch.bincount(got, minlength=7).double()
    expected = probs[0].double() * got.numel()
    sigma = (expected * (1 - probs[0].double())).sqrt()
    assert bool(((counts - expected).abs() <= 5 * sigma + 1e-9).all()), (counts, expected)
    assert counts[0] == counts[2] == counts[6] == 0
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x = torch.rand(3, 50).softmax(-1)
    assert draw(x, a).tolist() == draw(x, b).tolist()


def test_draw_refuses_rows_without_probability_mass():
    for bad in (torch.zeros(1, 4), torch.full((1, 4), float("nan"))):
        with pytest.raises(RuntimeError, match="cannot sample"):
            draw(bad, None)


def test_sample_with_top_k_one_is_greedy():
    logits = torch.randn(4, 300)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert sample(logits, 0.8, 1, None, g).tolist() == logits.argmax(-1).tolist()
