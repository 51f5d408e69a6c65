"""A sequence held to a grammar (structured.py builds and checks it) as it is generated: each step's logits are
masked to the tokens that continue the grammar, and the chosen token advances it. The engine's side of
structured output; the grammars themselves need no torch."""
from __future__ import annotations

import numpy as np
import torch

from .structured import compiled, vocabulary
from .tokenizer import TextTokenizer


class TokenConstraint:
    """One sequence's grammar: `restrict` masks a step's logits [V] in place to the tokens that continue it,
    `accept` advances it by the chosen token. Model logits past the tokenizer's vocabulary are masked too."""

    def __init__(self, grammar_text: str, tokenizer: TextTokenizer):
        self.vocab = vocabulary(tokenizer)
        self.matcher = compiled(self.vocab, grammar_text).deep_copy()
        self.words = np.zeros((self.vocab.vocab_size + 31) // 32, dtype=np.int32)  # one bit a token
        self.eos = set(self.vocab.eos_tokens)

    @property
    def finished(self) -> bool:
        """The grammar is complete and admits nothing more (or broke: a token it did not allow was forced)."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def accept(self, token: int) -> bool:
        """Advance by `token`; True once the grammar is finished (nothing more may follow)."""
        self.matcher.consume_token(token)
        return self.finished

    def ends_with(self, token: int) -> bool:
        """`token` is one of the end-of-sequence tokens the grammar allowed at its end (text it does not show)."""
        return token in self.eos

    def _mask(self) -> np.ndarray:
        """The grammar's mask now: one bit a token, in `words` (bit b of word w is token 32 w + b)."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        return self.words

    def allowed(self) -> np.ndarray:
        """The tokens that continue the grammar now, as a bool array over the tokenizer's vocabulary."""
        return np.unpackbits(self._mask().view(np.uint8), bitorder="little")[:self.vocab.vocab_size].view(np.bool_)

    def restrict(self, logits: torch.Tensor) -> None:
        """logits [V], in place: the tokens the grammar does not allow become -inf. The mask is applied through
        whichever side is smaller (a free-text step allows nearly everything, a JSON step a few hundred tokens):
        unpacking and filling all 201k entries cost ~0.5 ms a step against tens of microseconds this way."""
        words, n = self._mask(), logits.shape[-1]
        full = words == -1
        if np.count_nonzero(full) * 2 >= len(words):  # mostly allowed: -inf where a bit is clear
            ids = _bit_ids(words, np.flatnonzero(~full), want=0)
            ids = ids[ids < n]
            logits[torch.from_numpy(ids).to(logits.device)] = float("-inf")  # (a no-op move on CPU)
            if n > 32 * len(words):
                logits[32 * len(words):] = float("-inf")
        else:  # mostly refused: keep only where a bit is set
            ids = _bit_ids(words, np.flatnonzero(words), want=1)
            ids = ids[ids < n]
            if not len(ids):  # a dead end (llguidance allows the end tokens there itself): end the reply
                ids = np.array(sorted(t for t in self.eos if t < n), dtype=np.int64)
            ids = torch.from_numpy(ids).to(logits.device)
            kept = logits[ids]
            logits.fill_(float("-inf"))
            logits[ids] = kept


def _bit_ids(words: np.ndarray, which: np.ndarray, want: int) -> np.ndarray:
    """The token ids of the bits equal to `want` in words[which] (bit b of word w is token 32 w + b)."""
    bits = np.unpackbits(words[which].view(np.uint8), bitorder="little").reshape(-1, 32)
    rows, cols = np.nonzero(bits == want)
    return which[rows].astype(np.int64) * 32 + cols
