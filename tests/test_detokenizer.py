"""Incremental detokenization (runtime/tokenizer.py): deltas add up to the decoding of all ids, from a bounded window."""
import random

import pytest

from gptoss.runtime.tokenizer import IncrementalDetokenizer, TextTokenizer
from gptoss.tools.make_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return TextTokenizer(make_checkpoint(tmp_path_factory.mktemp("detok") / "ckpt", {"num_hidden_layers": 1}))


class CountingTokenizer:
    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def decode(self, ids):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids)


def test_deltas_add_up_to_the_whole_decoding_from_a_short_window(tokenizer):
    """Random ids (byte tokens that split multi-byte characters included): after every push the text is the
    decoding of all ids so far, less an unfinished character at the end; the decoder never sees the whole
    sequence (the old detokenizer decoded all of it on every push)."""
    rng = random.Random(0)
    vocab = tokenizer.tokenizer.get_vocab_size()
    ids = [rng.randrange(vocab) for _ in range(1500)]
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    deltas = []
    for i, token in enumerate(ids):
        deltas.append(detok.push(token))
        whole = tokenizer.decode(ids[: i + 1])
        assert whole.startswith(detok.text) and (detok.text == whole or whole.endswith("\ufffd"))
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text == tokenizer.decode(ids)
    assert counting.longest < 32, f"decoded a window of {counting.longest} ids"
