"""Structured output: a reply held to a grammar, token by token. At each step the tokens that cannot continue the
grammar are masked out (-inf) before the choice, greedy or sampled; the chosen token then advances it
(token_constraint.py: the engine's side). This module builds and checks the grammars, without torch, so a server's
front end checks them too. The grammar engine is llguidance (the Rust library llama.cpp and vLLM use; no
dependencies of its own), fed the checkpoint's tokenizer.json, so it works offline.

A grammar travels as llguidance's grammar text (a string: JSON naming one or more grammars), built here from what
a user asks for: a JSON schema (or any JSON object), a regular expression, a list of choices, or a Lark grammar.
`harmony_reply` puts such a grammar inside a GPT-OSS chat reply: free reasoning first, then the `final` message
held to it; `harmony_tool_call` holds a forced tool call's arguments to the function's parameter schema.
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

from .tokenizer import TextTokenizer, stop_token_ids

# JSON as one line with Python's spacing: `{"a": 1, "b": [2, 3]}`. Free whitespace lets a model emit blanks
# forever (a random-weight model does).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

MAX_CHOICES = 1024  # options one choice grammar may list


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a declared dependency; named if an install lacks it
        raise ValueError("structured output needs the llguidance package (pip install llguidance)") from e
    return llguidance


# -- what a reply may be: one grammar each (llguidance's grammar objects) ----------------------------------------
def json_schema(schema: dict | bool | None = None, *, lenient: bool = False) -> dict:
    """A JSON value following `schema` (None: any JSON object, OpenAI's JSON mode). `lenient` ignores keywords
    the compiler does not implement instead of refusing the schema."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    if isinstance(schema, bool):  # (true: any value; false: none)
        schema = {} if schema else {"not": {}}
    # the compiler's options go in the schema's x-guidance (a schema's own x-guidance, if it has one, stands)
    return {"json_schema": {"x-guidance": {**JSON_STYLE, "lenient": lenient}, **schema}}


def regex(pattern: str) -> dict:
    if not isinstance(pattern, str):
        raise ValueError(f"a regular expression must be a string, got {type(pattern).__name__}")
    return json.loads(_llguidance().LLMatcher.grammar_from_regex(pattern))["grammars"][0]


def choice(options: Sequence[str]) -> dict:
    """Exactly one of `options` (strings)."""
    if not isinstance(options, (list, tuple)) or not options or len(options) > MAX_CHOICES or \
            not all(isinstance(o, str) and o for o in options):
        raise ValueError(f"choices must be a list of 1 to {MAX_CHOICES} non-empty strings")
    return {"lark_grammar": "start: " + " | ".join(json.dumps(o) for o in options)}


def lark(text: str) -> dict:
    """A grammar in llguidance's Lark dialect (its rule `start` is the reply)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a grammar must be a non-empty string (llguidance's Lark syntax)")
    return {"lark_grammar": text}


def grammar(sub: dict) -> str:
    """The reply is `sub` and nothing else (completions; `Runtime.generate`)."""
    return json.dumps({"grammars": [sub]})


# The harmony wrappers name the special tokens as llguidance's Lark writes them (bare <|name|>): each one token.
_PREAMBLE = r"""
preamble: <|channel|> ("analysis" | "commentary") <|message|> TEXT <|end|> <|start|> "assistant"
TEXT: /(.|\n)*/
"""


def _calls(tools: list[dict]) -> tuple[list[str], list[dict]]:
    """For each of `tools`: a rule `call_i`, the rest of a call whose recipient is in the channel header (after
    `<|channel|>commentary to=functions.`: the name, the JSON marker, the arguments held to its `parameters`
    schema, <|call|>); a rule `role_call_i`, the rest of one whose recipient is in the role header (after
    `<|start|>assistant to=functions.`: the name, then `<|channel|>commentary [<|constrain|>]json<|message|>`, as
    the published chat template writes past calls); and the arguments' grammar. Schema keywords the compiler does
    not know are ignored: a call must go ahead."""
    rules, subs = [], []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        rules.append(f'call_{i}: {json.dumps(fn["name"] + " ")} <|constrain|> "json" <|message|> @args_{i} <|call|>')
        rules.append(f'role_call_{i}: {json.dumps(fn["name"])} <|channel|> "commentary " <|constrain|>? "json" '
                     f'<|message|> @args_{i} <|call|>')
        schema = json_schema(fn.get("parameters") or {"type": "object"}, lenient=True)
        subs.append({**schema, "name": f"args_{i}"})
    return rules, subs


def harmony_reply(sub: dict | None, tools: list[dict] | None = None) -> str:
    """A GPT-OSS chat reply (after the prompt's `<|start|>assistant`) whose answer is `sub`: messages of
    reasoning or commentary first, free, then the `final` message held to `sub` (None: free text) and ended by
    <|return|>, or, where `tools` are offered, a call to one of them with arguments held to its schema."""
    rules, subs = _calls(tools or [])
    answer = "@answer" if sub is not None else "TEXT"
    ending = f'<|channel|> "final" <|message|> {answer} <|return|>'
    if subs:  # (calls: either header form)
        calls = " | ".join(f"call_{i}" for i in range(len(subs)))
        role_calls = " | ".join(f"role_call_{i}" for i in range(len(subs)))
        ending = f'({ending} | <|channel|> "commentary to=functions." ({calls}) | " to=functions." ({role_calls}))'
    top = "\n".join([f"start: preamble* {ending}", _PREAMBLE, *rules])
    answers = [{**sub, "name": "answer"}] if sub is not None else []
    return json.dumps({"grammars": [{"lark_grammar": top}, *answers, *subs]})


def harmony_tool_call(tools: list[dict], name: str | None) -> str:
    """A forced tool call's rest, its arguments held to the function's `parameters` schema: with `name`, the
    prompt wrote the call's header up to <|message|>, so the reply is the arguments and <|call|>; without, the
    prompt ends at `to=functions.` and the reply names one of `tools` first."""
    if name is not None:
        tools = [t for t in tools if t["function"]["name"] == name]
        _, subs = _calls(tools)
        return json.dumps({"grammars": [{"lark_grammar": "start: @args_0 <|call|>"}, *subs]})
    rules, subs = _calls(tools)
    rules = [r for r in rules if r.startswith("call_")]  # (the prompt wrote the channel-header form's start)
    top = "\n".join(["start: " + " | ".join(f"call_{i}" for i in range(len(subs))), *rules])
    return json.dumps({"grammars": [{"lark_grammar": top}, *subs]})


# -- the grammar engine over one tokenizer --------------------------------------------------------------------
_vocabularies: "weakref.WeakKeyDictionary[TextTokenizer, object]" = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def vocabulary(tokenizer: TextTokenizer):
    """llguidance's view of `tokenizer` (every token's bytes; 1.3-1.6 s to build for gpt-oss's 201k tokens, so one
    per tokenizer, kept). Its end-of-sequence tokens are the checkpoint's stop tokens (generation_config.json),
    which a grammar allows once it may end."""
    if not tokenizer.available:
        raise ValueError("structured output needs the checkpoint's tokenizer.json")
    with _vocabularies_lock:
        found = _vocabularies.get(tokenizer)
        if found is None:
            stops = sorted(stop_token_ids(tokenizer.model_dir, ()))
            found = _llguidance().LLTokenizer(tokenizer.tokenizer.to_str(), eos_token=stops or None)
            _vocabularies[tokenizer] = found
        return found


def prepare(tokenizer: TextTokenizer) -> None:
    """Build `tokenizer`'s vocabulary now (a server at start-up), so the first request for structured output
    does not stall the others while it is built. Without llguidance installed, nothing (requests asking for
    structured output are then refused, naming the package)."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return
    if tokenizer.available:
        vocabulary(tokenizer)


def check(grammar_text: str, tokenizer: TextTokenizer) -> None:
    """ValueError naming what is wrong with a grammar (its text as built here) for this tokenizer. The check is
    the compilation, and the compiled grammar is kept: a request checked when it is submitted is not compiled
    again on the scheduler's thread when it takes its row (a large schema would stall every stream there)."""
    compiled(vocabulary(tokenizer), grammar_text)


COMPILED_KEPT = 64  # grammars kept compiled: a server's requests often repeat one schema
_compiled_grammars: "OrderedDict[tuple[int, str], tuple[object, object]]" = OrderedDict()
_compiled_lock = threading.Lock()


def compiled(vocab, grammar_text: str):
    """A matcher for `grammar_text` in its initial state, compiled once and kept (least recently used first
    out): a request copies it (3 us) instead of compiling (0.5-2.5 ms for the schemas in BENCHMARKS.md)."""
    key = (id(vocab), grammar_text)  # (the entry holds the vocabulary, so its id is not reused meanwhile)
    with _compiled_lock:
        found = _compiled_grammars.get(key)
        if found is not None and found[0] is vocab:
            _compiled_grammars.move_to_end(key)
            return found[1]
    matcher = _llguidance().LLMatcher(vocab, grammar_text, log_level=0)  # (errors are raised, not printed)
    if matcher.is_error():
        raise ValueError(f"the grammar is invalid: {matcher.get_error().strip()}")
    with _compiled_lock:
        _compiled_grammars[key] = (vocab, matcher)
        while len(_compiled_grammars) > COMPILED_KEPT:
            _compiled_grammars.popitem(last=False)
    return matcher
