"""Greedy choice through numpy on CPU (torch's CPU argmax is not vectorised) picks what torch.argmax picks; draws
follow their distribution; min-p, repetition/presence/frequency penalties and logit biases as documented."""
import pytest
import torch

from gptoss.runtime.sampling import adjust_logits, draw, greedy, sample
from gptoss.runtime.sampling_params import validate_adjustments, validate_sampling


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


def test_min_p_keeps_the_tokens_within_its_share_of_the_top_one():
    """probs 0.5, 0.3, 0.15, 0.05: min_p 0.5 keeps tokens at >= 0.25 (the first two), min_p 1 the top one only."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    kept = {int(sample(logits, 1.0, None, None, g, min_p=0.5)[0]) for _ in range(400)}
    assert kept == {0, 1}
    assert {int(sample(logits, 1.0, None, None, g, min_p=1.0)[0]) for _ in range(100)} == {0}
    assert {int(sample(logits, 1.0, None, None, g, min_p=0.0)[0]) for _ in range(400)} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="min_p"):
        validate_sampling(1.0, None, None, 1.5)


def test_adjust_logits_follows_each_definition():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    prompt, generated = [0, 1], [3, 3, 2]
    # repetition: every token of prompt or reply, positive logits divided, negative multiplied
    got = adjust_logits(logits, prompt, generated, repetition=2.0)
    assert got.tolist() == [1.0, -2.0, 0.25, 1.5, -2.0, 1.0]
    # presence and frequency: the reply's tokens only (3 twice, 2 once)
    got = adjust_logits(logits, prompt, generated, presence=0.5, frequency=0.25)
    assert got.tolist() == [2.0, -1.0, 0.5 - 0.75, 3.0 - 1.0, -2.0, 1.0]
    # negative penalties encourage repeats
    assert adjust_logits(logits, prompt, generated, frequency=-1.0)[3].item() == 5.0
    # biases add; the input is not touched
    got = adjust_logits(logits, prompt, generated, bias=((4, 100.0), (0, -100.0)))
    assert got.tolist() == [-98.0, -1.0, 0.5, 3.0, 98.0, 1.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]
    # nothing generated yet: presence/frequency change nothing
    assert adjust_logits(logits, prompt, [], presence=2.0, frequency=2.0).tolist() == logits.tolist()


@pytest.mark.parametrize("kw, match", [
    (dict(presence=2.5), "presence_penalty"), (dict(frequency=-3), "frequency_penalty"),
    (dict(frequency=float("nan")), "frequency_penalty"), (dict(repetition=0), "repetition_penalty"),
    (dict(bias=((7, 1.0),)), "outside the vocabulary"), (dict(bias=((1, 101.0),)), r"\[-100, 100\]"),
    (dict(bias=((1, 1.0), (1, 2.0))), "twice"), (dict(bias=tuple((i, 1.0) for i in range(1025))), "at most"),
])
def test_validate_adjustments_names_the_problem(kw, match):
    args = dict(presence=0.0, frequency=0.0, repetition=1.0, bias=())
    args.update(kw)
    vocab = 2000 if len(args["bias"]) > 1000 else 7
    with pytest.raises(ValueError, match=match):
        validate_adjustments(args["presence"], args["frequency"], args["repetition"], args["bias"], vocab)
