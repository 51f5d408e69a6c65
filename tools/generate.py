"""Generate from a checkpoint, with graphs loaded from an artifact directory built by gptoss.tools.compile.

    python -m gptoss.tools.generate --model checkpoints/bench --artifacts artifacts/bench --prompt "Hello" --max-new-tokens 64
    python -m gptoss.tools.generate --model DIR --backend eager --prompt "a" --prompt "b" --stream
    python -m gptoss.tools.generate --model DIR --chat --prompt "Largest city?" --json-schema schema.json
    torchrun --nproc-per-node 2 -m gptoss.tools.generate --tp 2 --model DIR --artifacts artifacts/tp2 --prompt "Hello"

Under torchrun every rank runs the same generation in lockstep; only rank 0 prints.

Shape settings (max batch, max sequence length, chunk, batch sizes) default to the ones the artifacts were built
with. Without --artifacts the inductor backend compiles in-process first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gptoss.runtime import Runtime, structured

from .cli import add_runtime_args, run_cli, settings_from_args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runtime_args(ap, backend_default="inductor")
    ap.add_argument("--artifacts", default=None, help="artifact directory from gptoss.tools.compile")
    ap.add_argument("--prompt", action="append", help="prompt text (repeatable); default: one built-in prompt")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    ap.add_argument("--stream", action="store_true")
    held = ap.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    held.add_argument("--json-schema", default=None,
                      help="hold the reply to a JSON schema: its JSON text, or a file holding it (with --chat: the "
                           "answer after the reasoning)")
    held.add_argument("--regex", default=None, help="hold the reply to a regular expression")
    held.add_argument("--choice", action="append", default=None, help="one of these strings (repeatable)")
    args = ap.parse_args(argv)
    try:
        grammar = _grammar(args)
    except ValueError as e:
        ap.error(str(e))

    t0 = time.perf_counter()
    # With --artifacts, unset shape settings come from this rank's manifest; nothing is compiled here.
    settings = settings_from_args(args, artifacts=args.artifacts, compile_missing=args.artifacts is None)
    rt = Runtime.from_pretrained(args.model, settings)
    ready = time.perf_counter() - t0
    prompts = args.prompt or ["The harbour at dawn was quiet, and the boats"]
    if args.chat:
        prompts = [rt.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed, stop=args.stop, grammar=grammar)
    say = print if rt.is_main_process else (lambda *a, **k: None)
    source = f"artifacts {args.artifacts}" if rt.graphs.loaded_from else f"backend {rt.backend}"
    say(f"ready in {ready:.1f}s ({source})", file=sys.stderr)
    t0 = time.perf_counter()
    if args.stream:
        for event in rt.generate(prompts, stream=True, **kw):
            if rt.is_main_process:
                sys.stdout.write(event.text if len(prompts) == 1 else f"[{event.index}] {event.text!r}\n")
                sys.stdout.flush()
        say()
    else:
        for p, r in zip(prompts, rt.generate(prompts, **kw)):
            say(f"{p!r} -> {r.text!r} [{r.finish_reason}, {len(r.token_ids)} tokens]")
    first = time.perf_counter() - t0
    s = rt.last_stats
    say(f"{s.generated_tokens} tokens in {first:.2f}s; decode {s.decode_tokens_per_s:.1f} tokens/s; "
        f"prefill {s.prompt_tokens} tokens in {s.prefill_s * 1e3:.0f} ms", file=sys.stderr)
    return 0


def _grammar(args) -> str | None:
    """The grammar the structured-output flags ask for (chat: wrapped as the harmony reply's answer), or None."""
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith("{") and Path(text).is_file():
            text = Path(text).read_text()
        try:
            sub = structured.json_schema(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema is neither a file nor JSON: {e}") from None
    elif args.regex is not None:
        sub = structured.regex(args.regex)
    elif args.choice:
        sub = structured.choice(args.choice)
    else:
        return None
    return structured.harmony_reply(sub) if args.chat else structured.grammar(sub)


if __name__ == "__main__":
    run_cli(main)
