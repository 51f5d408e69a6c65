"""The chat template rendered without transformers (runtime/chat_template.py) equals transformers' rendering: a
template that uses what GPT-OSS's published template uses (namespace, macros, tojson with options, strftime_now,
raise_exception, loop controls, special tokens), in each place transformers looks for a template."""
import json
import shutil

import pytest
import transformers

from gptoss.model.errors import CheckpointError
from gptoss.runtime.tokenizer import TextTokenizer
from gptoss.tools.make_checkpoint import make_checkpoint

TEMPLATE = """{%- macro args(spec) -%}
{%- for name, p in spec.get('properties', {}).items() -%}
{%- if name.startswith('_') %}{% continue %}{% endif -%}
{{ name }}: {{ p|tojson(indent=2, sort_keys=true) }}{% if not loop.last %}, {% endif %}
{%- if loop.index >= 3 %}{% break %}{% endif -%}
{%- endfor -%}
{%- endmacro -%}
{{- bos_token }}<|start|>system<|message|>Date: {{ strftime_now("%Y-%m-%d") }}
Reasoning: {{ reasoning_effort | default("medium") }}<|end|>
{%- if tools %}<|start|>developer<|message|>{% for t in tools %}{{ t.function.name }}({{ args(t.function.parameters or {}) }})
{% endfor %}<|end|>{% endif %}
{%- set state = namespace(last=none) %}
    {% if messages %}[{{ messages|length }}]{% endif %}
{%- for m in messages %}
  {%- if m.role == 'tool' and state.last is none %}{{ raise_exception("a tool reply without a call") }}{% endif %}
  {%- if m.role == 'assistant' and m.tool_calls %}{% set state.last = m.tool_calls[0].function.name %}
<|start|>assistant to=functions.{{ state.last }}<|message|>{{ m.tool_calls[0].function.arguments|tojson }}<|call|>
  {%- elif m.role == 'assistant' %}
<|start|>assistant{% if m.thinking %}<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}|{{ m.reasoning_content }}|<|channel|>final<|message|>{{ m.content }}<|end|>
  {%- else %}
<|start|>{{ m.role }}<|message|>{{ m.content if m.content is string else m.content|tojson(ensure_ascii=true) }}<|end|>
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start|>assistant{% endif %}{{ eos_token }}"""

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "b": {"type": "string", "enum": ["ü", "x"]}, "_hidden": {"type": "integer"}, "a": {"type": "number"},
    "c": {}, "d": {"type": "boolean"}}}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "hi ü"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": {"nested": "ü"}},
     {"role": "assistant", "content": "a", "reasoning": "r"}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "w"}, {"role": "assistant", "content": "", "thinking": "t",
                                       "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
     {"role": "tool", "content": "sunny"}],
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    make_checkpoint(path, "tiny")
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


def _pairs(path):
    ours, theirs = TextTokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    for messages in CONVERSATIONS:
        for kw in ({}, {"tools": TOOLS}, {"reasoning_effort": "high"}):
            for prompt in (True, False):
                yield (theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **kw),
                       ours.apply_chat_template(messages, add_generation_prompt=prompt, **kw))


def test_renders_as_transformers(ckpt):
    pairs = list(_pairs(ckpt))
    assert len(pairs) == 18 and all(want == got for want, got in pairs)
    assert "<|startoftext|>" in pairs[0][1] and pairs[0][1].endswith("<|start|>assistant<|return|>")


def test_template_from_the_tokenizer_config_and_by_name(ckpt, tmp_path):
    """tokenizer_config.json's "chat_template" (a string, or named templates: "tool_use" with tools), and
    additional_chat_templates/NAME.jinja beside chat_template.jinja."""
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    one = tmp_path / "config_string"
    shutil.copytree(ckpt, one)
    (one / "chat_template.jinja").unlink()
    (one / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    assert all(want == got for want, got in _pairs(one))

    named = tmp_path / "config_named"
    shutil.copytree(one, named)
    tool_use = "TOOLS {{ tools|length }} {{ messages|length }}"
    (named / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": [
        {"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": tool_use}]}))
    pairs = list(_pairs(named))
    assert all(want == got for want, got in pairs) and pairs[2][1] == "TOOLS 1 1"

    extra = tmp_path / "extra_files"
    shutil.copytree(ckpt, extra)
    (extra / "additional_chat_templates").mkdir()
    (extra / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
    pairs = list(_pairs(extra))
    assert all(want == got for want, got in pairs) and pairs[2][1] == "TOOLS 1 1"


def test_template_errors_name_the_file(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"chat_template\.jinja: the chat template fails: TemplateError: a "
                                              r"tool reply without a call"):
        TextTokenizer(bad).apply_chat_template([{"role": "tool", "content": "x"}])
    (bad / "chat_template.jinja").unlink()
    config = json.loads((bad / "tokenizer_config.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": 3}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: 'chat_template' must be a string or a list"):
        TextTokenizer(bad).apply_chat_template([{"role": "user", "content": "x"}])
    (bad / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no chat template"):
        TextTokenizer(bad).apply_chat_template([{"role": "user", "content": "x"}])
