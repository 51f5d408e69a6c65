"""A checkpoint's chat template, rendered as transformers' `apply_chat_template` renders it, without transformers:
its tokenizer classes import torch, which a server's front end otherwise never loads (~230 MB, and a stall of
seconds at its first chat request while every stream waited).

What transformers (5.x) does, and this does too:
- the template: chat_template.jinja ("default") and additional_chat_templates/NAME.jinja, or else
  tokenizer_config.json's "chat_template" (a string, or a list of {"name", "template"}); with tools, a template
  named "tool_use" where there is one, else "default";
- a sandboxed jinja2 environment with trim_blocks, lstrip_blocks and loop controls; `tojson` without HTML escaping
  (with its ensure_ascii, indent, separators and sort_keys), `raise_exception(message)` and `strftime_now(format)`;
- the variables: `messages` (a message's reasoning under `thinking` and `reasoning_content` alike, whichever it
  came as), `tools`, `documents` (None), `add_generation_prompt`, the named special tokens (bos_token, eos_token,
  ... from tokenizer_config.json, else special_tokens_map.json), then the caller's (`reasoning_effort`, ...).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptoss.model.errors import CheckpointError, json_kind, read_json_object, read_text

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the names a message's reasoning comes under


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _with_reasoning_aliases(message):
    if not isinstance(message, dict):
        return message
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    """The templates of one checkpoint (by name: "default", "tool_use", ...), their files, its special tokens."""

    def __init__(self, sources: dict[str, tuple[str, Path]], special_tokens: dict[str, str]):
        self.sources, self.special_tokens = sources, special_tokens
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_checkpoint(cls, model_dir: Path) -> "ChatTemplate":
        """The checkpoint's templates; ValueError if it has none, CheckpointError naming a file that is unusable."""
        model_dir = Path(model_dir)
        config_path = model_dir / CONFIG_FILE
        config = read_json_object(config_path) if config_path.is_file() else {}
        sources: dict[str, tuple[str, Path]] = {}
        if (model_dir / TEMPLATE_FILE).is_file():
            sources["default"] = (read_text(model_dir / TEMPLATE_FILE), model_dir / TEMPLATE_FILE)
        if (model_dir / TEMPLATE_DIR).is_dir():
            for path in sorted((model_dir / TEMPLATE_DIR).glob("*.jinja")):
                sources[path.name.removesuffix(".jinja")] = (read_text(path), path)
        if not sources:  # the files take priority over the config's entry, as in transformers
            sources = cls._config_templates(config.get("chat_template"), config_path)
        if not sources:
            raise ValueError(f"{model_dir} has no chat template ({TEMPLATE_FILE})")
        special_path = model_dir / SPECIAL_TOKENS_FILE
        special_map = read_json_object(special_path) if special_path.is_file() else {}
        special = {}
        for name in SPECIAL_TOKENS:  # tokenizer_config.json's, else special_tokens_map.json's
            texts = [t for t in (_token_text(config.get(name)), _token_text(special_map.get(name))) if t is not None]
            if texts:
                special[name] = texts[0]
        return cls(sources, special)

    @staticmethod
    def _config_templates(entry, path: Path) -> dict[str, tuple[str, Path]]:
        if entry is None:
            return {}
        if isinstance(entry, str):
            return {"default": (entry, path)}
        if isinstance(entry, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                           and isinstance(t.get("template"), str) for t in entry):
            return {t["name"]: (t["template"], path) for t in entry}
        raise CheckpointError(f"{path}: 'chat_template' must be a string or a list of {{\"name\", \"template\"}} "
                              f"objects, found {json_kind(entry)}")

    def name_for(self, tools) -> str:
        if tools is not None and "tool_use" in self.sources:
            return "tool_use"
        if "default" in self.sources:
            return "default"
        raise ValueError(f"the checkpoint has several chat templates ({sorted(self.sources)}) and none named "
                         f"'default'")

    def source(self, tools=None) -> str:
        return self.sources[self.name_for(tools)][0]

    def render(self, messages: list[dict], *, tools=None, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt; CheckpointError naming the template's file (and line) where the template fails."""
        name = self.name_for(tools)
        text, path = self.sources[name]
        try:
            template = self._compiled.get(name)
            if template is None:
                template = self._compiled[name] = _environment().from_string(text)
            return template.render(messages=[_with_reasoning_aliases(m) for m in messages], tools=tools,
                                   documents=None, add_generation_prompt=add_generation_prompt,
                                   **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            line = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
            raise CheckpointError(f"{path}: the chat template fails{line}: {type(e).__name__}: {e}") from e
