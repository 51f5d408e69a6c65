"""The checkpoint's tokenizer (`tokenizer.json`, read with the `tokenizers` library, offline) and its stop ids.

A file here that cannot be used (tokenizer.json, generation_config.json, the chat template's files) raises
CheckpointError naming it, never the library's own exception."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from gptoss.model.errors import CheckpointError, json_kind, parse_json, read_file, read_json_object

from .chat_template import ChatTemplate

def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's, o200k's) printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the other 68 take the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(0x100 + n): b for n, b in enumerate(others)}}


_BYTE_OF_CHAR = _byte_level_chars()


def _rust_failure(e: BaseException) -> bool:
    """`tokenizers` raises a bare Exception for a file it cannot parse, and pyo3's PanicException (a
    BaseException) where its Rust code panics on one: both mean the file is unusable."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def read_tokenizer(path: Path) -> Tokenizer:
    data = read_file(path)
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except BaseException as e:
        if not _rust_failure(e):
            raise
        parse_json(data, path)  # a UTF-8 or JSON fault, named with its line and column
        raise CheckpointError(f"{path}: not a tokenizer the `tokenizers` library can read: {e}") from e


class TextTokenizer:
    def __init__(self, model_dir: str | Path | None):
        self.model_dir, self._chat = (Path(model_dir) if model_dir is not None else None), None
        self._specials: set[int] | None = None
        path = self.model_dir / "tokenizer.json" if self.model_dir is not None else None
        self.tokenizer = read_tokenizer(path) if path is not None and path.is_file() else None

    @property
    def available(self) -> bool:
        return self.tokenizer is not None

    def _require(self):
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass prompts as lists of token ids")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._require().encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], **template_kwargs) -> str:
        """The checkpoint's chat template (harmony for GPT-OSS) rendered as a prompt ending where the assistant
        speaks, as transformers renders it (chat_template.py). `template_kwargs` (e.g. `tools`,
        `reasoning_effort`) are variables the template may read."""
        return self._chat_template().render(messages, **template_kwargs)

    def chat_template_source(self) -> str:
        return self._chat_template().source()

    def _chat_template(self) -> ChatTemplate:
        if self.model_dir is None:
            raise ValueError("no checkpoint directory, so no chat template")
        if self._chat is None:
            self._chat = ChatTemplate.from_checkpoint(self.model_dir)
        return self._chat

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token) if self.tokenizer else None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a piece of a character for some byte-level tokens: OpenAI's logprobs
        report them as bytes). A special token: its text."""
        tok = self._require()
        piece = tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._specials is None:
            self._specials = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        if token_id not in self._specials and all(ch in _BYTE_OF_CHAR for ch in piece):
            return bytes(_BYTE_OF_CHAR[ch] for ch in piece)
        return self.decode([token_id]).encode("utf-8")  # not a byte-level piece: its decoded text


def stop_token_ids(model_dir: str | Path, config_eos: tuple[int, ...]) -> set[int]:
    """EOS ids from generation_config.json (the published models stop at <|return|> and <|call|> there),
    falling back to config.json's."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        eos = read_json_object(path).get("eos_token_id")
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise CheckpointError(f"{path}: 'eos_token_id' must be a token id or a list of them, found "
                                      f"{json_kind(eos)}")
            return set(ids)
    return set(config_eos)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back bytes of an unfinished UTF-8 character.

    Each push decodes a window, not the whole sequence (that cost grew with the output: 0.38 ms a token at 1,000
    tokens, vs 15 us at 64): the tokens after the last emitted text, plus the tokens of that emission as context
    (a decoder may render a token differently at the start of a sequence). The delta is what the new tokens add to
    the context's text; `text` is the sum of the deltas, the decoding of all the ids."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self._context = self._pending = 0  # ids[_context:_pending] were emitted last; ids[_pending:] are not yet

    def _delta(self) -> str | None:
        before = self.tokenizer.decode(self.ids[self._context:self._pending])
        after = self.tokenizer.decode(self.ids[self._context:])
        return after[len(before):] if after.startswith(before) else None

    def _emit(self, delta: str) -> str:
        self.text += delta
        self._context, self._pending = self._pending, len(self.ids)
        return delta

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        delta = self._delta()
        if delta is None or delta.endswith("\ufffd"):
            return ""
        return self._emit(delta)

    def flush(self) -> str:
        """Emit whatever is held back (an unfinished character decodes as U+FFFD)."""
        delta = self._delta()
        return self._emit(self.tokenizer.decode(self.ids[self._pending:]) if delta is None else delta)
