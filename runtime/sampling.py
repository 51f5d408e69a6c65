"""Next-token choice from logits: greedy at temperature 0, else temperature, top-k, top-p (nucleus) sampling."""
from __future__ import annotations

import torch


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> the first index of each row's maximum [B] (int64), NaN counting as the maximum as in
    torch.argmax. On CPU through numpy: torch's CPU argmax does not vectorise (16k logits: 55 us vs 7 us; gpt-oss's
    201k: 0.6-0.7 ms vs 0.1 ms, a fifth of a decode step)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.detach().numpy().argmax(axis=-1).astype("int64", copy=False))
    return logits.argmax(dim=-1)


MAX_LOGPROBS = 20  # alternatives a request may ask for at each token (OpenAI's top_logprobs limit)


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """logits [V] -> the log-probability of `token` and the `top` most likely tokens with theirs (most likely first).
    Under the model's own distribution: the raw logits' softmax, before temperature, top-k or top-p (as vLLM reports
    them by default), so the same text gets the same figures whatever the sampling settings."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = float(logprobs[token])
    if top <= 0:
        return chosen, ()
    values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
    return chosen, tuple(zip(ids.tolist(), values.tolist()))


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64)."""
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
    return draw(logits.softmax(-1), generator)


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
