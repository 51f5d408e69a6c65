"""Next-token choice from logits: greedy at temperature 0, else temperature, top-k, top-p (nucleus) and min-p
sampling; before either, a sequence's penalties and logit biases (`LogitAdjustments`)."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> the first index of each row's maximum [B] (int64), NaN counting as the maximum as in
    torch.argmax. On CPU through numpy: torch's CPU argmax does not vectorise (16k logits: 55 us vs 7 us; gpt-oss's
    201k: 0.6-0.7 ms vs 0.1 ms, a fifth of a decode step)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.detach().numpy().argmax(axis=-1).astype("int64", copy=False))
    return logits.argmax(dim=-1)


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """logits [V] -> the log-probability of `token` and the `top` most likely tokens with theirs (most likely first).
    Under the model's own distribution: the raw logits' softmax, before temperature, top-k or top-p (as vLLM reports
    them by default), so the same text gets the same figures whatever the sampling settings."""
    return positions_logprobs(logits[None], [token], top)[0]


def positions_logprobs(logits: torch.Tensor, targets: Sequence[int], top: int
                       ) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    """logits [T, V] (position t's) -> for each t, token_logprobs(logits[t], targets[t], top), in one pass."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(list(targets), device=logprobs.device)[:, None])[:, 0].tolist()
    if top <= 0:
        return [(c, ()) for c in chosen]
    values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
    return [(c, tuple(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


class LogitAdjustments:
    """One sequence's penalties and biases, applied to its logits [V] before greedy and sampled choices alike
    (log-probabilities stay the raw model's), in this order:
    - `repetition` (as in transformers and llama.cpp): each token of the prompt or of the reply so far has its
      logit divided by it where positive and multiplied by it where negative;
    - `presence` and `frequency` (the OpenAI API's definition, over the reply's tokens, as vLLM counts them):
      logit -= count * frequency + (count > 0) * presence;
    - `bias`: (token, value) pairs added to those tokens' logits.
    The state is kept sparse and updated a token at a time: the prompt's distinct tokens once, as a tensor; the
    reply's new tokens and their counts in dicts. A step then touches only those entries (a vocabulary-sized state
    cost ~1 ms a step for gpt-oss's 201,088 entries against 17-59 us this way; BENCHMARKS.md)."""

    @classmethod
    def of(cls, prompt: Sequence[int], *, presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0,
           bias: Sequence[tuple[int, float]] = (), device=None) -> "LogitAdjustments | None":
        """The adjustments these settings make, or None where they make none."""
        if not (presence or frequency or repetition != 1.0 or bias):
            return None
        return cls(prompt, presence=presence, frequency=frequency, repetition=repetition, bias=bias, device=device)

    def __init__(self, prompt: Sequence[int], *, presence: float = 0.0, frequency: float = 0.0,
                 repetition: float = 1.0, bias: Sequence[tuple[int, float]] = (), device=None):
        self.presence, self.frequency, self.repetition, self.device = presence, frequency, repetition, device
        self.prompt_seen = set(prompt) if repetition != 1.0 else set()
        self.prompt_ids = torch.tensor(sorted(self.prompt_seen), dtype=torch.long, device=device)
        self.new_seen: dict[int, None] = {}  # reply tokens not in the prompt, in order
        self.counts: dict[int, int] = {}  # the reply's tokens (for presence and frequency)
        self.bias_ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=device)
        self.bias_values = torch.tensor([float(v) for _, v in bias], dtype=torch.float32, device=device)

    def generated(self, token: int) -> None:
        """The reply's next token."""
        if self.repetition != 1.0 and token not in self.prompt_seen:
            self.new_seen[token] = None
        if self.presence or self.frequency:
            self.counts[token] = self.counts.get(token, 0) + 1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> a new tensor with the adjustments applied."""
        out = logits.float().clone()
        if self.repetition != 1.0 and (self.prompt_seen or self.new_seen):
            seen = self.prompt_ids
            if self.new_seen:
                seen = torch.cat((seen, torch.tensor(list(self.new_seen), dtype=torch.long, device=self.device)))
            values = out[seen]
            out[seen] = torch.where(values > 0, values / self.repetition, values * self.repetition)
        if self.counts:
            ids = torch.tensor(list(self.counts), dtype=torch.long, device=self.device)
            counts = torch.tensor(list(self.counts.values()), dtype=torch.float32, device=self.device)
            out[ids] -= counts * self.frequency + self.presence
        if self.bias_ids.numel():
            out[self.bias_ids] += self.bias_values
        return out


def adjust_logits(logits: torch.Tensor, context: Sequence[int], generated: Sequence[int], *, presence: float = 0.0,
                  frequency: float = 0.0, repetition: float = 1.0, bias: Sequence[tuple[int, float]] = ()
                  ) -> torch.Tensor:
    """`LogitAdjustments` at once: logits [V] after the prompt `context` and the reply's tokens `generated`."""
    adjust = LogitAdjustments(context, presence=presence, frequency=frequency, repetition=repetition, bias=bias,
                              device=logits.device)
    for token in generated:
        adjust.generated(token)
    return adjust(logits)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None, min_p: float | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64). `min_p` drops the tokens less likely than min_p times the most
    likely one (after temperature, top-k and top-p)."""
    if temperature == 0:
        return greedy(logits)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [B, V] (rows summing to ~1) -> one index per row [B] (int64), index i with probability probs[i]: the
    first index whose running total (float64) passes a uniform draw times the row's total. One random number a row;
    torch.multinomial draws an exponential variate per vocabulary entry instead (CPU: 0.5 ms for 16k entries, a
    tenth of a decode step; ~6 ms for gpt-oss's 201k). A zero-probability index is never chosen. On an accelerator
    torch.multinomial stays (its kernel is the device's own; float64 is not one an NPU is built for)."""
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = torch.cumsum(probs, -1, dtype=torch.float64)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise RuntimeError("cannot sample: a row of probabilities is not finite or sums to zero")
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    chosen = torch.searchsorted(cdf, u * total, right=True).clamp_(max=probs.shape[-1] - 1)
    # The running total only rises at an index with probability, so a zero is picked only when u * total rounded up
    # to the total itself: then the last index that has probability.
    zero = probs.gather(-1, chosen) == 0
    if bool(zero.any()):
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)
        chosen = torch.where(zero, last, chosen)
    return chosen.squeeze(-1)
