"""What sampling a request may ask for: the limits and their checks. No torch here: a server's front end checks
requests with these before sending them to the engine."""
from __future__ import annotations

import math

from .invalid import invalid

MAX_LOGPROBS = 20  # alternatives a request may ask for at each token (OpenAI's top_logprobs limit)


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None = None) -> None:
    if temperature < 0:
        raise invalid("temperature", f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise invalid("top_k", f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise invalid("top_p", f"top_p must be in (0, 1] (or None), got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise invalid("min_p", f"min_p must be in [0, 1] (or None), got {min_p}")


def validate_logprobs(name: str, value) -> None:
    """`value`: how many alternatives to report with each token's log-probability (None: no log-probabilities)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS):
        raise invalid(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}] (alternatives per token) or None, "
                            f"got {value!r}")


MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as the OpenAI API has them
MAX_BIAS = 100.0  # a logit bias lies in [-100, 100] (OpenAI's range)
MAX_LOGIT_BIASES = 1024  # tokens one request may bias


def validate_adjustments(presence: float, frequency: float, repetition: float, bias, vocab_size: int) -> None:
    """`LogitAdjustments`' settings, checked for a vocabulary of `vocab_size` tokens."""
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
            raise invalid(name, f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
    if not (isinstance(repetition, (int, float)) and math.isfinite(repetition) and repetition > 0):
        raise invalid("repetition_penalty", f"repetition_penalty must be a number > 0 (1: none), got {repetition!r}")
    if len(bias) > MAX_LOGIT_BIASES:
        raise invalid("logit_bias", f"logit_bias may bias at most {MAX_LOGIT_BIASES} tokens, got {len(bias)}")
    seen = set()
    for token, value in bias:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            raise invalid("logit_bias", f"logit_bias names token {token!r}, outside the vocabulary [0, {vocab_size})")
        if token in seen:
            raise invalid("logit_bias", f"logit_bias names token {token} twice")
        seen.add(token)
        if not (isinstance(value, (int, float)) and -MAX_BIAS <= value <= MAX_BIAS):
            raise invalid("logit_bias", f"logit_bias of token {token} must be a number in [-{MAX_BIAS:g}, "
                                        f"{MAX_BIAS:g}], got {value!r}")
