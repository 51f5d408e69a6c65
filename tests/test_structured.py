"""Structured output (runtime/structured.py): the mask a grammar puts on a step's logits is exactly the tokens
that continue it, and `Runtime.generate(grammar=...)` replies are the argmax of the masked logits of a fresh
prefill at each point: valid JSON for a schema, a regular expression's match, one of the choices."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from gptoss.runtime import Runtime, structured
from gptoss.runtime.token_constraint import TokenConstraint, _bit_ids
from gptoss.tools.make_checkpoint import make_checkpoint

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "color", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("structured") / "tiny", "tiny")
    return Runtime.from_pretrained(ckpt, progress=False, max_batch_size=4, max_seq_len=256)


def dense_mask(constraint: TokenConstraint, logits: torch.Tensor) -> torch.Tensor:
    """The reference: every entry of the unpacked mask applied, and the logits past the vocabulary refused."""
    allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
    bits = torch.from_numpy(constraint.allowed().copy())
    allowed[:min(len(bits), len(allowed))] = bits[:len(allowed)]
    return logits.masked_fill(~allowed, float("-inf"))


def walk(constraint: TokenConstraint, tokens: list[int], vocab: int) -> list[int]:
    """Feed `tokens`, checking at every step that `restrict` equals the dense mask and keeps the next token;
    the allowed counts along the way."""
    counts = []
    for t in tokens:
        assert not constraint.finished
        logits = torch.randn(vocab)
        want = dense_mask(constraint, logits)
        constraint.restrict(logits)
        assert torch.equal(logits, want) and torch.isfinite(logits[t]), t
        counts.append(int(torch.isfinite(logits).sum()))
        constraint.accept(t)
    return counts


@pytest.mark.parametrize("extra", [0, 37])  # logits past the tokenizer's vocabulary (a padded lm_head) stay refused
def test_restrict_is_the_grammar_mask(rt, extra):
    """Both ways of applying the mask (few tokens allowed: keep them; nearly all: refuse the rest) equal the
    dense mask, through a harmony reply with free reasoning (nearly everything allowed) and a JSON answer (a
    handful), and the grammar finishes exactly at <|return|>."""
    tok, vocab = rt.tokenizer, rt.config.vocab_size + extra
    reply = ("<|channel|>analysis<|message|>Think, then answer.<|end|><|start|>assistant<|channel|>final<|message|>"
             '{"ok": true, "color": "blue", "n": 42}<|return|>')
    c = TokenConstraint(structured.harmony_reply(structured.json_schema(SCHEMA)), tok)
    counts = walk(c, tok.encode(reply), vocab)
    assert c.finished and min(counts) == 1 and max(counts) > vocab // 2  # both branches ran
    # a token outside the grammar is refused: the JSON answer may not start with a letter
    c = TokenConstraint(structured.harmony_reply(structured.json_schema(SCHEMA)), tok)
    prefix = tok.encode("<|channel|>final<|message|>")
    walk(c, prefix, vocab)
    logits = torch.zeros(vocab)
    c.restrict(logits)
    assert torch.isinf(logits[tok.encode("x")[0]]) and torch.isfinite(logits[tok.encode("{")[0]])


def test_tool_call_grammar_holds_arguments_to_the_schema(rt):
    tok = rt.tokenizer
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}}, {"type": "function", "function": {"name": "now"}}]
    named = TokenConstraint(structured.harmony_tool_call(tools, "get_weather"), tok)
    walk(named, tok.encode('{"city": "Oslo"}<|call|>'), rt.config.vocab_size)
    assert named.finished
    wrong = TokenConstraint(structured.harmony_tool_call(tools, "get_weather"), tok)
    assert walk(wrong, tok.encode('{"'), rt.config.vocab_size)
    logits = torch.zeros(rt.config.vocab_size)
    wrong.restrict(logits)  # only "city" may follow
    assert torch.isinf(logits[tok.encode("t")[0]]) and torch.isfinite(logits[tok.encode("c")[0]])
    chosen = TokenConstraint(structured.harmony_tool_call(tools, None), tok)
    walk(chosen, tok.encode("now <|constrain|>json<|message|>{}<|call|>"), rt.config.vocab_size)
    assert chosen.finished
    # a whole reply that may answer freely or call a tool (strict function calling): both end the grammar
    # (a call's recipient in the channel header, or in the role header as the published template writes calls)
    for reply in ("<|channel|>final<|message|>Any text at all.<|return|>",
                  "<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>commentary "
                  'to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>',
                  "<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant to=functions.get_weather"
                  '<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>',
                  ' to=functions.now<|channel|>commentary <|constrain|>json<|message|>{}<|call|>'):
        free = TokenConstraint(structured.harmony_reply(None, tools), tok)
        walk(free, tok.encode(reply), rt.config.vocab_size)
        assert free.finished


def constrained_reference(rt: Runtime, prompt: list[int], grammar: str, n: int) -> list[int]:
    """Greedy under the grammar from first principles: argmax of a fresh prefill's logits, the dense mask applied."""
    c, out = TokenConstraint(grammar, rt.tokenizer), []
    for _ in range(n):
        t = int(dense_mask(c, rt.logits([prompt + out])[0]).argmax())
        out.append(t)
        if c.accept(t) or t in rt.eos_ids:
            break
    return out


@pytest.mark.parametrize("kind", ["schema", "json_object", "regex", "choice"])
def test_generate_follows_the_grammar(rt, kind):
    grammars = {"schema": structured.json_schema(SCHEMA), "json_object": structured.json_schema(None),
                "regex": structured.regex(r"[0-9]{3}-[a-z]{2,4}"),
                "choice": structured.choice(["alpha", "beta gamma", "delta"])}
    sub = grammars[kind]
    prompts = ["The sea is", "Hello"]
    results = rt.generate(prompts, max_new_tokens=40, grammar=sub)
    for prompt, r in zip(prompts, results):
        want = constrained_reference(rt, rt.tokenizer.encode(prompt), structured.grammar(sub), 40)
        assert r.token_ids == want
        if r.finish_reason == "stop":  # (a free JSON object may run to the budget on random weights)
            check_text(kind, r.text)
        else:
            assert kind == "json_object" and r.finish_reason == "length"
    # sampled replies follow it too
    for r in rt.generate(prompts * 2, max_new_tokens=40, grammar=sub, temperature=1.0, seed=7, top_p=0.95):
        if kind != "json_object":
            assert r.finish_reason == "stop", r
            check_text(kind, r.text)


def check_text(kind: str, text: str) -> None:
    if kind == "schema":
        value = json.loads(text)
        assert set(value) == {"ok", "color", "n"} and isinstance(value["ok"], bool)
        assert value["color"] in ("red", "green", "blue") and 0 <= value["n"] <= 99
        assert text == json.dumps(value)  # one line, Python's spacing (structured.JSON_STYLE)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
    else:
        assert text in ("alpha", "beta gamma", "delta")


def test_bad_grammars_are_refused(rt):
    for bad, match in ((structured.json_schema({"type": "objectx"}), "objectx"),
                       (structured.lark("start: undefined_rule"), "undefined_rule"),
                       (structured.regex("[a-"), "regex")):
        with pytest.raises(ValueError, match=match):
            rt.generate(["Hi"], max_new_tokens=4, grammar=bad)
    for call, match in ((lambda: structured.choice([]), "choices"), (lambda: structured.choice(["a", 3]), "choices"),
                        (lambda: structured.json_schema([1]), "schema"), (lambda: structured.regex(5), "string")):
        with pytest.raises(ValueError, match=match):
            call()
    assert rt.generate(["Hi"], max_new_tokens=2, ignore_eos=True)[0].finish_reason == "length"  # still usable


def test_mask_bit_order():
    """Bit b of word w is token 32 w + b (llguidance's layout), on both sides of the choice `restrict` makes."""
    words = np.array([0b1011, -1, 0, -(1 << 31)], dtype=np.int32)  # (the last: bit 31 alone)
    assert _bit_ids(words, np.array([0, 3]), want=1).tolist() == [0, 1, 3, 127]
    assert _bit_ids(words, np.array([0]), want=0).tolist()[:3] == [2, 4, 5]


def test_dead_end_allows_only_the_end_tokens(rt):
    """Where a grammar allows nothing (never seen: llguidance itself allows the end tokens there), the step is
    left the end tokens, so a sampled choice never meets an all -inf row."""
    c = TokenConstraint(structured.grammar(structured.json_schema(SCHEMA)), rt.tokenizer)

    class Nothing:
        def unsafe_compute_mask_ptr(self, pointer, size):
            c.words[:] = 0

    c.matcher = Nothing()
    logits = torch.randn(rt.config.vocab_size)
    c.restrict(logits)
    assert set(torch.isfinite(logits).nonzero().flatten().tolist()) == c.eos and c.eos


def test_without_llguidance(rt, monkeypatch):
    """An install without the grammar engine still serves; asking for structured output is refused, naming it."""
    monkeypatch.setitem(__import__("sys").modules, "llguidance", None)  # (import then raises ImportError)
    from gptoss.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(rt.tokenizer.model_dir)  # a tokenizer whose vocabulary was never built
    structured.prepare(tok)
    with pytest.raises(ValueError, match="llguidance"):
        structured.check('{"grammars": [{"lark_grammar": "start: \\"a\\""}]}', tok)


def test_compiled_grammars_are_shared_not_their_state(rt):
    """A grammar is compiled once (kept for later requests; checking a request compiles it, so its row copies
    it); each sequence advances its own copy."""
    tok = rt.tokenizer
    checked = structured.grammar(structured.regex("[0-9]+ apples"))
    structured.check(checked, tok)
    assert (id(structured.vocabulary(tok)), checked) in structured._compiled_grammars
    g = structured.grammar(structured.choice(["ab", "cd"]))
    first, second = TokenConstraint(g, tok), TokenConstraint(g, tok)
    assert (id(structured.vocabulary(tok)), g) in structured._compiled_grammars
    walk(first, tok.encode("ab"), rt.config.vocab_size)
    assert first.finished and not second.finished
    logits = torch.zeros(rt.config.vocab_size)
    second.restrict(logits)  # still at the start: "c" may begin its reply
    assert torch.isfinite(logits[tok.encode("c")[0]])


def test_generate_command_takes_a_grammar(rt, capsys, tmp_path):
    """`tools.generate --json-schema FILE|JSON / --regex / --choice` (with --chat: the harmony reply's answer)."""
    from gptoss.tools.generate import main

    model = str(rt.tokenizer.model_dir)
    common = ["--model", model, "--backend", "eager", "--max-new-tokens", "60"]
    assert main([*common, "--prompt", "Time:", "--regex", "[0-9]{2}:[0-9]{2}"]) == 0
    assert re.search(r"-> '[0-9]{2}:[0-9]{2}' \[stop", capsys.readouterr().out)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main([*common, "--chat", "--prompt", "Colour?", "--json-schema", str(schema)]) == 0
    said = capsys.readouterr().out
    answer = said.split("<|message|>")[-1].split("' [")[0]
    assert "[stop" in said and set(json.loads(answer)) == {"ok", "color", "n"}
    with pytest.raises(SystemExit):
        main([*common, "--json-schema", "{bad"])
    assert "neither a file nor JSON" in capsys.readouterr().err
