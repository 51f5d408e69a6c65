"""Stop strings over text that arrives in pieces: the chat server matches them on the answer the client sees
(the parsed `content`), not on the raw harmony markup the model writes around it."""
from __future__ import annotations

from .invalid import invalid
from .tokenizer import TextTokenizer


class StopText:
    """`push(piece)` returns the part of the text that became visible; text that could be the start of a stop
    string is held back until the next pieces show it is not one. Once a stop string appears, `hit` is True and
    the text ends just before it. `flush()` (at the end of the stream) returns what is still held back."""

    def __init__(self, stops: list[str]):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(stops)
        self.text = ""
        self.emitted = 0
        self.hit = False

    def push(self, piece: str) -> str:
        if self.hit:
            return ""
        self.text += piece
        end = None
        for s in self.stops:
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at >= 0 and (end is None or at < end):
                end = at
        if end is not None:
            self.hit = True
        else:
            end = len(self.text) - held_back(self.text, self.stops)
        return self._emit(end)

    def flush(self) -> str:
        return "" if self.hit else self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        out = self.text[self.emitted:max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return out


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def parse_stop(stop, vocab_size: int, tokenizer: TextTokenizer) -> tuple[set[int], list[str]]:
    """`stop` (None, a string, a token id, or a list of them) as (stop token ids, stop strings); a bad entry
    raises TypeError/ValueError naming it."""
    if stop is None:
        return set(), []
    if isinstance(stop, (str, int)):
        stop = [stop]
    ids, strings = set(), []
    for s in stop:
        if isinstance(s, bool) or not isinstance(s, (str, int)):
            raise invalid("stop", f"stop entries must be strings or token ids, got {s!r}", kind=TypeError)
        if isinstance(s, int):
            if not 0 <= s < vocab_size:
                raise invalid("stop", f"stop token id {s} is outside the vocabulary [0, {vocab_size})")
            ids.add(s)
        elif not s:
            raise invalid("stop", "stop strings must be non-empty")
        elif not tokenizer.available:
            raise invalid("stop", "stop strings need the checkpoint's tokenizer.json; pass stop token ids instead")
        else:
            strings.append(s)
    return ids, strings
