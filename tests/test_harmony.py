"""The harmony parser on token sequences built from the tiny checkpoint's real special tokens (and its BPE for the
text between them), and chat rendering with its template."""
from __future__ import annotations

import json

import pytest

from gptoss.runtime.harmony import HarmonyStreamParser, HarmonyTokens, parse, render_chat, template_messages
from gptoss.runtime.tokenizer import TextTokenizer
from gptoss.tools.make_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return TextTokenizer(make_checkpoint(tmp_path_factory.mktemp("harmony"), "tiny"))


@pytest.fixture(scope="module")
def ht(tok):
    return HarmonyTokens.from_tokenizer(tok)


def ids(tok, *pieces) -> list[int]:
    """Special tokens given by name ("<|end|>") are looked up one by one, so none is split by the BPE."""
    out = []
    for p in pieces:
        special = tok.token_id(p) if p.startswith("<|") else None
        out += [special] if special is not None else tok.encode(p)
    return out


def reasoning_then_final(tok):
    return ids(tok, "<|channel|>", "analysis", "<|message|>", "User greets. Reply kindly.", "<|end|>",
               "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "Hello, how are you?", "<|return|>")


def tool_call(tok):
    return ids(tok, "<|channel|>", "analysis", "<|message|>", "Need the weather.", "<|end|>",
               "<|start|>", "assistant", "<|channel|>", "commentary to=functions.get_weather ", "<|constrain|>",
               "json", "<|message|>", '{"city": "Oslo"}', "<|call|>")


def collect(deltas) -> dict:
    out = {"reasoning": "", "content": "", "calls": []}
    for d in deltas:
        if d.kind == "tool_call":
            assert d.index == len(out["calls"])
            out["calls"].append([d.name, ""])
        elif d.kind == "tool_arguments":
            out["calls"][d.index][1] += d.text
        else:
            out[d.kind] += d.text
    return out


def stream(ht, tok, seq, cut=None) -> dict:
    p = HarmonyStreamParser(ht, tok.decode)
    deltas = [d for t in seq[:cut] for d in p.push(t)] + p.finish()
    return collect(deltas), p


def test_reasoning_then_final(tok, ht):
    p = parse(ht, tok.decode, reasoning_then_final(tok))
    assert p.reasoning == "User greets. Reply kindly."
    assert p.content == "Hello, how are you?"
    assert p.tool_calls == [] and p.ended_with == "return"


def test_tool_call(tok, ht):
    p = parse(ht, tok.decode, tool_call(tok))
    assert p.reasoning == "Need the weather." and p.content == ""
    assert len(p.tool_calls) == 1 and p.ended_with == "call"
    call = p.tool_calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert call.content_type == "json"


def test_recipient_in_role_header(tok, ht):
    seq = ids(tok, "<|start|>", "assistant to=functions.lookup", "<|channel|>", "commentary", "<|message|>",
              "{}", "<|call|>")
    p = parse(ht, tok.decode, seq)
    assert [(c.name, c.arguments) for c in p.tool_calls] == [("lookup", "{}")]


def test_commentary_without_recipient_is_content(tok, ht):
    seq = ids(tok, "<|channel|>", "commentary", "<|message|>", "Let me check.", "<|end|>")
    assert parse(ht, tok.decode, seq).content == "Let me check."


@pytest.mark.parametrize("make", [reasoning_then_final, tool_call])
def test_streamed_equals_whole_at_every_split(tok, ht, make):
    seq = make(tok)
    whole = parse(ht, tok.decode, seq)
    expect = {"reasoning": whole.reasoning, "content": whole.content,
              "calls": [[c.name, c.arguments] for c in whole.tool_calls]}
    for cut in range(len(seq) + 1):
        # two feeds split at `cut` (a stream delivered in two network chunks) give the whole result
        p = HarmonyStreamParser(ht, tok.decode)
        first = [d for t in seq[:cut] for d in p.push(t)]
        rest = [d for t in seq[cut:] for d in p.push(t)] + p.finish()
        assert collect(first + rest) == expect, cut
        # a reply truncated at `cut` gives a prefix of every field
        part, _ = stream(ht, tok, seq, cut)
        assert expect["reasoning"].startswith(part["reasoning"]), cut
        assert expect["content"].startswith(part["content"]), cut
        for (name, args), (wname, wargs) in zip(part["calls"], expect["calls"]):
            assert name == wname and wargs.startswith(args)


def test_truncated_output(tok, ht):
    seq = reasoning_then_final(tok)
    cut = seq.index(ht.message, seq.index(ht.start)) + 3  # three tokens into the final message
    part, p = stream(ht, tok, seq, cut)
    assert part["reasoning"] == "User greets. Reply kindly."
    assert part["content"] and "Hello, how are you?".startswith(part["content"])
    assert p.ended_with is None
    # cut inside a header: nothing of it is shown
    part, p = stream(ht, tok, seq, seq.index(ht.start) + 2)
    assert part == {"reasoning": "User greets. Reply kindly.", "content": "", "calls": []}


def test_multibyte_character_split_across_tokens(tok, ht):
    text = "caf\u00e9 \u2603 ok"
    body = tok.encode(text)
    assert len(body) > len(text.split())  # the byte-level BPE splits the non-ASCII characters
    seq = ids(tok, "<|channel|>", "final", "<|message|>") + body + [ht.return_]
    p = HarmonyStreamParser(ht, tok.decode)
    for t in seq:
        for d in p.push(t):
            assert "\ufffd" not in d.text
    assert p.content == text


def test_not_harmony_falls_back_to_content(tok, ht):
    seq = tok.encode("plain words " * 40)
    p = parse(ht, tok.decode, seq)
    assert p.content == "plain words " * 40 and p.reasoning == ""


def test_render_chat_with_template(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
            {"role": "user", "content": "Weather?"}]
    text = render_chat(tok, msgs, reasoning_effort="low")
    assert text == ("<|start|>system<|message|>Be brief.<|end|><|start|>user<|message|>Hi<|end|>"
                    "<|start|>assistant<|channel|>analysis<|message|>greet back<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>Hello<|end|>"
                    "<|start|>user<|message|>Weather?<|end|><|start|>assistant")


def test_render_chat_rejects_bad_messages(tok):
    with pytest.raises(ValueError, match="role"):
        render_chat(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty"):
        render_chat(tok, [])
    with pytest.raises(ValueError, match="reasoning_effort"):
        render_chat(tok, [{"role": "user", "content": "x"}], reasoning_effort="max")
    with pytest.raises(ValueError, match="tools\\[0\\]"):
        render_chat(tok, [{"role": "user", "content": "x"}], tools=[{"type": "function"}])
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(ValueError, match="does not support tools"):  # the tiny template has no tools section
        render_chat(tok, [{"role": "user", "content": "x"}], tools=tools)


def test_template_messages_tool_round_trip():
    msgs = template_messages([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3 C"}])
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert msgs[2] == {"role": "tool", "content": "3 C", "name": "get_weather", "tool_call_id": "call_1"}
