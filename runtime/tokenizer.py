"""The checkpoint's tokenizer (`tokenizer.json`, read with the `tokenizers` library, offline) and its stop ids."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer


class TextTokenizer:
    def __init__(self, model_dir: str | Path | None):
        self.model_dir, self._chat = (Path(model_dir) if model_dir is not None else None), None
        path = self.model_dir / "tokenizer.json" if self.model_dir is not None else None
        self.tokenizer = Tokenizer.from_file(str(path)) if path is not None and path.is_file() else None

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
        speaks. Uses transformers' renderer, which supplies the helpers the published template calls.
        `template_kwargs` (e.g. `tools`, `reasoning_effort`) are variables the template may read."""
        return self._chat_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                          **template_kwargs)

    def chat_template_source(self) -> str:
        template = self._chat_tokenizer().chat_template
        return template if isinstance(template, str) else str(template)

    def _chat_tokenizer(self):
        from transformers import AutoTokenizer

        if self.model_dir is None:
            raise ValueError("no checkpoint directory, so no chat template")
        if self._chat is None:
            self._chat = AutoTokenizer.from_pretrained(self.model_dir)
            if not self._chat.chat_template:
                raise ValueError(f"{self.model_dir} has no chat template (chat_template.jinja)")
        return self._chat

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token) if self.tokenizer else None


def stop_token_ids(model_dir: str | Path, config_eos: tuple[int, ...]) -> set[int]:
    """EOS ids from generation_config.json (the published models stop at <|return|> and <|call|> there),
    falling back to config.json's."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return set(eos if isinstance(eos, list) else [eos])
    return set(config_eos)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return delta
