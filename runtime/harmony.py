"""GPT-OSS's harmony format: the reply parsed by channel as it streams, and chat messages rendered into a prompt.

A reply is a run of messages, each `<|start|>ROLE HEADER<|message|>BODY` closed by `<|end|>` (more follows),
`<|return|>` (the turn is over) or `<|call|>` (a tool call: the turn is over until its result arrives). The header
holds `<|channel|>CHANNEL`, an optional recipient `to=functions.NAME` and an optional `<|constrain|>TYPE`. The
prompt ends with `<|start|>assistant`, so the first message's header starts right away:

    <|channel|>analysis<|message|>Need the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>

`analysis` is reasoning, `final` the answer, `commentary` with a recipient a tool call (without one, text the
user sees). The parser works on token ids (the special tokens are single tokens), one token at a time, so a
stream cut at any token gives a prefix of what the whole reply gives. The official `openai-harmony` package is not
used: it downloads its vocabulary at run time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

SPECIALS = ("start", "channel", "message", "end", "return", "call", "constrain")

# A header that runs this long without <|message|> is not harmony: the tokens are then shown as plain content.
MAX_HEADER_TOKENS = 64


@dataclass(frozen=True)
class HarmonyTokens:
    """The ids of the harmony special tokens in one tokenizer."""

    start: int
    channel: int
    message: int
    end: int
    return_: int
    call: int
    constrain: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "HarmonyTokens":
        """`tokenizer` has `token_id(text) -> int | None` (runtime.tokenizer.TextTokenizer)."""
        ids, missing = {}, []
        for name in SPECIALS:
            tid = tokenizer.token_id(f"<|{name}|>")
            if tid is None:
                missing.append(f"<|{name}|>")
            ids["return_" if name == "return" else name] = tid
        if missing:
            raise ValueError(f"the tokenizer has no harmony special tokens {missing}: not a GPT-OSS checkpoint")
        return cls(**ids)


@dataclass(frozen=True)
class HarmonyDelta:
    """One piece of parsed output. kind: "reasoning" | "content" | "tool_call" (a call begins: `name`, `index`) |
    "tool_arguments" (more of call `index`'s arguments text)."""

    kind: str
    text: str = ""
    index: int | None = None
    name: str | None = None


@dataclass
class ToolCall:
    name: str
    arguments: str = ""
    content_type: str | None = None  # from <|constrain|>, e.g. "json"


@dataclass
class _Header:
    tokens: list[int] = field(default_factory=list)  # every header token so far
    parts: list[tuple[str, list[int]]] = field(default_factory=lambda: [("role", [])])


class HarmonyStreamParser:
    """Feed the generated token ids one at a time with `push`; call `finish` when generation ends. Each returns
    the deltas that became certain. The whole reply is then in `reasoning`, `content`, `tool_calls`;
    `ended_with` is "return", "call" or None (cut off). `content_positions`: which pushed tokens (counted from 0)
    the last push made part of `content`: that token, or when a header turns out not to be harmony, every token
    of it. `reasoning_tokens` counts the pushed tokens that were reasoning text."""

    def __init__(self, tokens: HarmonyTokens, decode: Callable[[list[int]], str]):
        self.t, self.decode = tokens, decode
        self.reasoning, self.content, self.tool_calls = "", "", []
        self.ended_with: str | None = None
        self._header: _Header | None = _Header()  # the prompt already said <|start|>assistant
        self._raw: list[int] = []  # every token of the current message since its <|start|> (for the fallback)
        self._raw_at: list[int] = []  # their positions among the pushed tokens
        self._pushed = 0
        self._plain = False  # gave up on harmony structure: everything is content
        self._body: list[int] = []
        self._body_text = ""  # decoded text of _body already emitted
        self._kind: str | None = None  # where the current body goes: reasoning / content / tool_arguments
        self._pending_call: HarmonyDelta | None = None  # a call's announcement, sent with its first body delta
        self._done = False
        self.content_positions: list[int] = []
        self.reasoning_tokens = 0

    # -- feeding ---------------------------------------------------------------------------------------------
    def prefill(self, ids: list[int]) -> None:
        """Tokens the prompt already wrote of the reply (a forced tool call's header, see `forced_call`): parsed
        as the reply's start, not counted among the pushed tokens."""
        for token in ids:
            self.push(token)
        self._pushed, self.content_positions = 0, []

    def push(self, token: int) -> list[HarmonyDelta]:
        self.content_positions, at = [], self._pushed
        self._pushed += 1
        if self._done:
            return []
        t = self.t
        if self._plain:
            self.content_positions = [at]
            return self._plain_token(token)
        if self._header is not None:
            return self._header_token(token)
        if token in (t.end, t.return_, t.call):
            out = self._flush_body()
            self._close_message(token)
            return out
        if token == t.start:  # a new message without <|end|>: close this one
            out = self._flush_body()
            self._close_message(t.end)
            self._header = _Header()
            return out
        self._body.append(token)
        if self._kind == "content":
            self.content_positions = [at]
        elif self._kind == "reasoning":
            self.reasoning_tokens += 1
        return self._body_delta(final=False)

    def finish(self) -> list[HarmonyDelta]:
        """End of generation (stop token, length, cancellation): emit text held back for an unfinished
        character; a header cut off before <|message|> shows nothing (it held no text meant for the user)."""
        if self._done:
            return []
        self._done = True
        if self._plain:
            return self._body_delta(final=True)
        if self._header is None:
            return self._body_delta(final=True)
        return []

    # -- header ------------------------------------------------------------------------------------------------
    def _header_token(self, token: int) -> list[HarmonyDelta]:
        t, h = self.t, self._header
        self._raw.append(token)
        self._raw_at.append(self._pushed - 1)
        if token == t.message:
            self._open_message(h)
            return []
        if token == t.channel:
            h.parts.append(("channel", []))
        elif token == t.constrain:
            h.parts.append(("constrain", []))
        elif token == t.start:
            h.parts = [("role", [])]  # a repeated <|start|>: the header begins again
        elif token in (t.end, t.return_, t.call):  # a message with no body
            self._header = _Header()
            self._raw, self._raw_at = [], []
            if token != t.end:
                self.ended_with, self._done = ("return" if token == t.return_ else "call"), True
            return []
        else:
            h.parts[-1][1].append(token)
        h.tokens.append(token)
        if len(h.tokens) > MAX_HEADER_TOKENS:
            return self._give_up()
        return []

    def _open_message(self, h: _Header) -> None:
        text = {name: self.decode(ids) for name, ids in h.parts}
        words = {name: self.decode(ids).split() for name, ids in h.parts}
        channel = words.get("channel", [None])[0] if words.get("channel") else None
        match = re.search(r"to=(\S+)", " ".join(text.values()))
        recipient = match.group(1) if match else None
        constrain = words["constrain"][0] if words.get("constrain") else None
        if recipient is not None and channel != "analysis":
            name = recipient[len("functions."):] if recipient.startswith("functions.") else recipient
            self.tool_calls.append(ToolCall(name, "", constrain))
            self._kind = "tool_arguments"
            self._pending_call = HarmonyDelta("tool_call", "", len(self.tool_calls) - 1, name)
        else:
            self._kind = "reasoning" if channel == "analysis" else "content"
            self._pending_call = None
        self._header, self._raw, self._raw_at, self._body, self._body_text = None, [], [], [], ""

    def _give_up(self) -> list[HarmonyDelta]:
        """Not harmony after all: show every token of the reply from here on as content."""
        self._plain, self._kind, self._pending_call = True, "content", None
        self._body, self._body_text = list(self._raw), ""
        self.content_positions = list(self._raw_at)
        self._header, self._raw, self._raw_at = None, [], []
        return self._body_delta(final=False)

    def _plain_token(self, token: int) -> list[HarmonyDelta]:
        self._body.append(token)
        return self._body_delta(final=False)

    # -- body --------------------------------------------------------------------------------------------------
    def _body_delta(self, final: bool) -> list[HarmonyDelta]:
        out = []
        if self._pending_call is not None:  # announce a call as soon as its header is complete
            out.append(self._pending_call)
            self._pending_call = None
        text = self.decode(self._body)
        if not final and (text.endswith("\ufffd") or not text.startswith(self._body_text)):
            return out  # an unfinished UTF-8 character: wait for its next byte
        delta = text[len(self._body_text):] if text.startswith(self._body_text) else ""
        self._body_text = text
        if delta:
            out.append(self._record(delta))
        return out

    def _record(self, delta: str) -> HarmonyDelta:
        if self._kind == "reasoning":
            self.reasoning += delta
            return HarmonyDelta("reasoning", delta)
        if self._kind == "tool_arguments":
            self.tool_calls[-1].arguments += delta
            return HarmonyDelta("tool_arguments", delta, len(self.tool_calls) - 1)
        self.content += delta
        return HarmonyDelta("content", delta)

    def _flush_body(self) -> list[HarmonyDelta]:
        return self._body_delta(final=True)

    def _close_message(self, token: int) -> None:
        t = self.t
        self._body, self._body_text, self._kind = [], "", None
        if token == t.return_:
            self.ended_with, self._done = "return", True
        elif token == t.call:
            self.ended_with, self._done = "call", True
        else:
            self._header = _Header()


def parse(tokens: HarmonyTokens, decode: Callable[[list[int]], str], ids: list[int]) -> HarmonyStreamParser:
    """The whole reply at once (the same result as pushing each id, then `finish`)."""
    p = HarmonyStreamParser(tokens, decode)
    for i in ids:
        p.push(i)
    p.finish()
    return p


# ---------------------------------------------------------------------------------------------- chat rendering

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")


def _text(content, where: str) -> str:
    """OpenAI message content: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': ...}}")
            out.append(part["text"])
        return "".join(out)
    raise ValueError(f"{where}.content must be a string or a list of text parts")


def template_messages(messages) -> list[dict]:
    """OpenAI chat messages -> the message dicts GPT-OSS chat templates read: assistant reasoning as `thinking`,
    tool calls as `tool_calls` with `function.arguments` (parsed JSON when it is JSON), tool results as role
    `tool` with `content` (and the name of the call they answer, when it can be found)."""
    import json

    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out, call_names = [], {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {list(ROLES)}, got {role!r}")
        msg = {"role": role, "content": _text(m.get("content"), where)}
        if role == "assistant":
            thinking = m.get("reasoning_content", m.get("reasoning"))
            if thinking is not None:
                msg["thinking"] = _text(thinking, where + ".reasoning_content")
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ValueError(f"{where}.tool_calls must be a list")
            converted = []
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ValueError(f"{where}.tool_calls[{j}] must have function.name and function.arguments")
                args = fn.get("arguments", "")
                try:
                    args = json.loads(args) if isinstance(args, str) and args else args
                except ValueError:
                    pass  # not JSON: the template writes the text as it is
                converted.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
                if c.get("id"):
                    call_names[c["id"]] = fn["name"]
            if converted:
                msg["tool_calls"] = converted
        elif role == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id"))
            if name:
                msg["name"] = name
            if m.get("tool_call_id"):
                msg["tool_call_id"] = m["tool_call_id"]
        elif m.get("content") is None:
            raise ValueError(f"{where}.content is required for role {role!r}")
        out.append(msg)
    return out


def validate_tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}}")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                             f"'parameters': ...}}}}")
    return tools or None


def forced_call(tools, tool_choice) -> str:
    """The start of the assistant's reply that `tool_choice` forces, as prompt text after `<|start|>assistant`:
    "required" opens a call to one of the functions, whose name the model writes; {"type": "function",
    "function": {"name": N}} opens a call to N, whose JSON arguments the model writes (held to the function's
    schema by the grammar the server adds: `structured.harmony_tool_call`). "" for "auto"/"none"/None.
    ValueError names a bad choice."""
    if tool_choice in (None, "auto", "none"):
        return ""
    names = [t["function"]["name"] for t in validate_tools(tools) or []]
    if not names:
        raise ValueError("tool_choice needs 'tools'")
    if tool_choice == "required":
        return "<|channel|>commentary to=functions."
    chosen = isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
    function = tool_choice.get("function") if chosen else None
    name = function.get("name") if isinstance(function, dict) else None
    if name is None:
        raise ValueError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                         "{'name': ...}}")
    if name not in names:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools {names}")
    return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"


def render_chat(tokenizer, messages, *, tools=None, reasoning_effort: str | None = None) -> str:
    """The prompt for `messages` with the checkpoint's chat template, ending where the assistant speaks.
    `tools` and `reasoning_effort` go to the template as the published gpt-oss template names them; a template
    that never reads `tools` cannot tell the model about them, so tools are refused there rather than dropped."""
    msgs = template_messages(messages)
    tools = validate_tools(tools)
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {list(REASONING_EFFORTS)}, got {reasoning_effort!r}")
    kwargs = {}
    if tools:
        if "tools" not in tokenizer.chat_template_source():
            raise ValueError("this checkpoint's chat template does not support tools")
        kwargs["tools"] = tools
    if reasoning_effort is not None:
        kwargs["reasoning_effort"] = reasoning_effort
    return tokenizer.apply_chat_template(msgs, **kwargs)
