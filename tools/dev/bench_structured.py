"""What structured output costs (runtime/structured.py): building the grammar vocabulary (once a process), a
request's grammar (checked, then compiled for its sequence), each step's mask and advance along a reply, and the
decode step with and without a grammar through `Runtime.generate`.

    python -m gptoss.tools.dev.bench_structured --model checkpoints/bench [--batch 1 4] [--tokens 64]
    python -m gptoss.tools.dev.bench_structured --model /work/ckpt-20b --no-decode   # the tokenizer's costs only
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gptoss.runtime import Runtime, structured
from gptoss.runtime.token_constraint import TokenConstraint
from gptoss.runtime.tokenizer import TextTokenizer

SMALL = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
         "required": ["city", "population"], "additionalProperties": False}
# a larger, nested schema: 24 properties of several kinds, an array of objects, enums, bounds
NESTED = {"type": "object", "additionalProperties": False, "required": ["id", "items"], "properties": {
    **{f"field_{i}": [{"type": "string", "maxLength": 40}, {"type": "integer", "minimum": 0},
                      {"type": "number"}, {"enum": ["a", "b", "c"]}, {"type": "boolean"},
                      {"type": "array", "items": {"type": "string"}}][i % 6] for i in range(24)},
    "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
    "items": {"type": "array", "maxItems": 10, "items": {
        "type": "object", "required": ["sku", "qty"], "additionalProperties": False,
        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}, "note": {
            "anyOf": [{"type": "string"}, {"type": "null"}]}}}}}}
REPLY = json.dumps({"city": "Tokyo", "population": 37400068})
REASONING = "The user asks for the largest city. Tokyo's metro area is the largest, about 37 million people. " * 3


def ms(f, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def per_token_us(grammar: str, tokenizer: TextTokenizer, ids: list[int], vocab: int) -> float:
    """Mean time of one step's restrict + accept along `ids`."""
    c, logits = TokenConstraint(grammar, tokenizer), torch.zeros(vocab)
    t0 = time.perf_counter()
    for t in ids:
        c.restrict(logits)
        c.accept(t)
    return 1e6 * (time.perf_counter() - t0) / len(ids)


def tokenizer_costs(model: str, vocab: int | None) -> None:
    tok = TextTokenizer(model)
    t0 = time.perf_counter()
    structured.vocabulary(tok)
    print(f"vocabulary: {time.perf_counter() - t0:.2f} s for {structured.vocabulary(tok).vocab_size} tokens (once)")
    vocab = vocab or structured.vocabulary(tok).vocab_size
    for name, schema in (("small schema", SMALL), ("nested schema (24 properties)", NESTED)):
        for where, grammar in (("completion", structured.grammar(structured.json_schema(schema))),
                               ("chat", structured.harmony_reply(structured.json_schema(schema)))):
            check = ms(lambda: structured.check(grammar, tok))
            build = ms(lambda: TokenConstraint(grammar, tok))
            print(f"{name}, {where}: check {check:.2f} ms, compile for a sequence {build:.2f} ms")
    json_ids = tok.encode(REPLY)
    chat = (f"<|channel|>analysis<|message|>{REASONING}<|end|><|start|>assistant<|channel|>final<|message|>"
            f"{REPLY}<|return|>")
    chat_ids = tok.encode(chat)
    print(f"per step (mask + advance), JSON reply ({len(json_ids)} tokens): "
          f"{per_token_us(structured.grammar(structured.json_schema(SMALL)), tok, json_ids, vocab):.0f} us")
    print(f"per step, chat reply with reasoning ({len(chat_ids)} tokens): "
          f"{per_token_us(structured.harmony_reply(structured.json_schema(SMALL)), tok, chat_ids, vocab):.0f} us")


def decode_costs(model: str, batches: list[int], tokens: int, rounds: int) -> None:
    rt = Runtime.from_pretrained(model, progress=False, max_batch_size=max(batches), max_seq_len=512)
    prompts = ["The largest city in the world is", "Write the population:", "A list of numbers:", "Hello"]
    cases = (("none", None),
             ("free text (regex, nearly all tokens allowed)", structured.regex("[^\\x00]*")),
             ("JSON (an array of integers: a few tokens allowed)",
              structured.json_schema({"type": "array", "items": {"type": "integer"}})))
    for b in batches:
        batch = (prompts * b)[:b]
        for name, sub in cases:
            per_step = []
            for _ in range(rounds):
                rt.generate(batch, max_new_tokens=tokens, ignore_eos=True, grammar=sub)
                s = rt.last_stats
                per_step.append(1e3 * s.decode_s / max(s.decode_steps, 1))
            print(f"batch {b}, grammar {name}: decode step {min(per_step):.2f} ms (best of {rounds}; "
                  f"{s.decode_steps} steps last round)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-decode", action="store_true", help="the tokenizer's costs only (no model loaded)")
    args = p.parse_args(argv)
    tokenizer_costs(args.model, None)
    if not args.no_decode:
        decode_costs(args.model, args.batch, args.tokens, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
