"""Greedy choice through numpy on CPU (torch's CPU argmax is not vectorised) picks what torch.argmax picks."""
import torch

from gptoss.runtime.sampling import greedy, sample


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
