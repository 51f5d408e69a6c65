"""What a caller asks of the scheduler (`Request`), what it gets back (`TokenEvent`s), and the checks a request
passes before it is queued. No torch here: a server's front end builds and checks requests with this module
before sending them to the engine's process."""
from __future__ import annotations

from dataclasses import dataclass

from .invalid import invalid
from .sampling_params import validate_adjustments, validate_logprobs, validate_sampling
from .stop_text import parse_stop
from .structured import check as check_grammar
from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple = ()  # strings and/or token ids, as `Runtime.generate` takes them
    ignore_eos: bool = False
    logprobs: int | None = None  # each token's log-probability and this many alternatives' (None: not computed)
    # the same for the prompt's tokens after the first (delivered with the first event; every position is
    # prefilled, none reused); with it, max_tokens may be 0: the prompt is scored and nothing generated
    prompt_logprobs: int | None = None
    min_p: float | None = None
    # sampling.LogitAdjustments': applied before greedy and sampled choices alike
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) pairs
    grammar: str | None = None  # the grammar the reply follows (runtime.structured builds it), token by token

    @property
    def scores_prompt(self) -> bool:
        """Its prompt is scored: every position prefilled through the model's Python, alone, nothing reused."""
        return self.prompt_logprobs is not None


@dataclass
class TokenEvent:
    """One streamed token of prompt `index` (-1: none, on a last event that only ends it); `finish_reason` is set
    on that prompt's last event. `logprob` and `top_logprobs` ((token id, log-probability), most likely first)
    where the request asked for them."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # the prompt's tokens' (log-probability, top_logprobs), the first token's (None, ()): on a request's first
    # event, where it asked for them (Request.prompt_logprobs)
    prompt_logprobs: tuple | None = None


class QueueFull(RuntimeError):
    def __init__(self, capacity: int, retry_after_s: float):
        super().__init__(f"the server is busy: {capacity} requests are already waiting; retry later")
        self.capacity, self.retry_after_s = capacity, retry_after_s


def check_request(request: Request, vocab_size: int, max_seq_len: int, tokenizer: TextTokenizer) -> None:
    """Raise ValueError/TypeError naming what is wrong with `request` for a model of `vocab_size` tokens served
    with a context of `max_seq_len` (the scheduler before queueing it, and a server's front end before sending it)."""
    if not request.prompt:
        raise invalid("prompt", "the prompt is empty: at least one token is needed")
    bad = [t for t in request.prompt if not 0 <= t < vocab_size]
    if bad:
        raise invalid("prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(request.prompt) >= max_seq_len:
        raise invalid("prompt", f"the prompt has {len(request.prompt)} tokens, but this server's context is "
                                f"{max_seq_len} tokens (max_seq_len) and must leave room for at least one generated "
                                f"token", code="context_length_exceeded")
    scoring = request.scores_prompt  # (then the prompt alone may be the point: max_tokens 0)
    if not isinstance(request.max_tokens, int) or isinstance(request.max_tokens, bool) or \
            request.max_tokens < (0 if scoring else 1):
        raise invalid("max_tokens", f"max_tokens must be a {'non-negative' if scoring else 'positive'} integer, "
                                    f"got {request.max_tokens!r}")
    validate_sampling(request.temperature, request.top_k, request.top_p, request.min_p)
    validate_adjustments(request.presence_penalty, request.frequency_penalty, request.repetition_penalty,
                         request.logit_bias, vocab_size)
    validate_logprobs("logprobs", request.logprobs)
    validate_logprobs("prompt_logprobs", request.prompt_logprobs)
    parse_stop(list(request.stop), vocab_size, tokenizer)
    if request.grammar is not None:
        try:
            check_grammar(request.grammar, tokenizer)
        except ValueError as exc:
            raise invalid("grammar", str(exc)) from None
