"""Token log-probabilities in OpenAI's two response shapes: /v1/completions' columns (tokens, token_logprobs,
top_logprobs, text_offset) and /v1/chat/completions' list of content tokens (token, logprob, bytes, top_logprobs).
The figures come with each TokenEvent (the scheduler computes them where a request asks); this module only names
the tokens and lays them out."""
from __future__ import annotations

FLOOR = -9999.0  # a token the model rules out: JSON has no -Infinity (vLLM reports the same floor)


def _finite(logprob: float) -> float:
    return logprob if logprob > FLOOR else FLOOR  # (NaN too)


class TokenNames:
    """A token's bytes and text: byte-level pieces decode to part of a character (text with U+FFFD, the bytes
    exact). Without a tokenizer (token-id prompts) a token is named `token_id:N`, as vLLM names them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer if tokenizer.available else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        named = self._cache.get(token_id)
        if named is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
                named = text, list(text.encode())
            else:
                raw = self.tokenizer.token_bytes(token_id)
                named = raw.decode("utf-8", errors="replace"), list(raw)
            self._cache[token_id] = named
        return named


class CompletionLogprobs:
    """/v1/completions' `logprobs` object, filled a token at a time; `take()` returns what came since the last
    take (a streamed chunk's share)."""

    def __init__(self, names: TokenNames):
        self.names, self.offset = names, 0
        self._parts: dict[str, list] = self._empty()

    @staticmethod
    def _empty() -> dict[str, list]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, event) -> None:
        if event.token_id >= 0 and event.logprob is not None:
            self._append(event.token_id, event.logprob, event.top_logprobs)

    def add_prompt(self, prompt, scores) -> None:
        """`echo`: the prompt's tokens first, with their figures (TokenEvent.prompt_logprobs: the first token's
        are None, as OpenAI reports them)."""
        for token, (logprob, top) in zip(prompt, scores or ()):
            self._append(token, logprob, top)

    def _append(self, token: int, logprob: float | None, top) -> None:
        text = self.names(token)[0]
        self._parts["tokens"].append(text)
        self._parts["token_logprobs"].append(None if logprob is None else _finite(logprob))
        self._parts["top_logprobs"].append({self.names(t)[0]: _finite(lp) for t, lp in top} if top else None)
        self._parts["text_offset"].append(self.offset)
        self.offset += len(text)

    def take(self) -> dict[str, list]:
        parts, self._parts = self._parts, self._empty()
        return parts


class ChatLogprobs:
    """/v1/chat/completions' `logprobs.content`: the tokens whose text is the reply's `content` (the harmony
    parser says which: markup, reasoning and tool-call arguments are left out)."""

    def __init__(self, names: TokenNames):
        self.names, self.content, self._pending = names, [], []

    def add(self, event) -> None:
        if event.token_id < 0 or event.logprob is None:
            return
        entry = self._entry(event.token_id, event.logprob)
        entry["top_logprobs"] = [self._entry(t, lp) for t, lp in event.top_logprobs]
        self.content.append(entry)
        self._pending.append(entry)

    def _entry(self, token_id: int, logprob: float) -> dict:
        text, raw = self.names(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": raw}

    def take(self) -> dict:
        """The entries since the last take, as a streamed chunk's `logprobs`."""
        pending, self._pending = self._pending, []
        return {"content": pending, "refusal": None}

    def whole(self) -> dict:
        return {"content": self.content, "refusal": None}
