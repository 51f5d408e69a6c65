"""A multi-turn conversation through the serving scheduler, with and without prefix reuse: each turn's prompt is
the conversation so far (system prompt, earlier messages, earlier replies) plus a new message, as a chat client
sends it. Prints each turn's time to first token, the prompt tokens reused, and whether both runs produced the
same greedy tokens. Reused K/V were computed in other steps than a fresh prefill's, so logits agree to rounding;
where replies differ, the first differing token is explained: the largest |Δlogits| up to there against the gap
between the two runs' top tokens. A flip at a near tie of the logits is rounding; a larger |Δlogits| is either a
router near tie upstream (a token whose k-th and k+1-th experts' scores tie within rounding can take the other
expert: found on gpt-oss-20b's shapes, BENCHMARKS.md) or a bug, and the tool exits 1 for a look.

    python -m gptoss.tools.dev.turns_bench --model checkpoints/bench --turns 8 [--interleave-chunk 64]
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from gptoss.runtime import Runtime
from gptoss.runtime.scheduler import Request, Scheduler


class _LogitsKept(Scheduler):
    """Keeps each sampled row's logits (the conversation runs one request at a time: one row a call)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept: list[torch.Tensor] = []

    def _sample(self, logits, rows):
        self.kept.extend(logits.float().cpu().clone())
        return super()._sample(logits, rows)


ROUNDING = 1e-3  # the largest |dlogits| rounding explains here (measured: 2e-6 on bench, 3e-5 on gpt-oss-20b)
BEYOND = "beyond rounding at the logits: a router near tie upstream, or a bug"


def first_difference(on: _LogitsKept, off: _LogitsKept) -> tuple[str, bool]:
    """Where two runs' greedy tokens first differ, how far apart their logits were and how close the choice; and
    whether rounding explains it: every |dlogits| up to there within ROUNDING, and a flip only between tokens whose
    logits were within twice the largest deviation."""
    worst = 0.0
    for k, (a, b) in enumerate(zip(on.kept, off.kept)):
        worst = max(worst, (a - b).abs().max().item())
        ta, tb = int(a.argmax()), int(b.argmax())
        if ta != tb:
            gap = (b[tb] - b[ta]).item()
            tie = gap <= 2 * worst <= 2 * ROUNDING
            return (f"first different token: #{k} of the conversation's sampled tokens ({ta} with reuse, {tb} "
                    f"without); max |dlogits| up to there {worst:.2e}, the two tokens' logits {gap:.2e} apart "
                    f"without reuse ({'a near tie: rounding' if tie else BEYOND})"), tie
    return f"no different token; max |dlogits| {worst:.2e}", worst <= ROUNDING


def conversation(scheduler: Scheduler, system: list[int], messages: list[list[int]], reply_tokens: int):
    """Runs the turns one after another; returns [(prompt length, ttft s, reused, reply)] per turn."""
    history, turns = list(system), []
    for message in messages:
        prompt = history + message
        reply, first = [], []
        before = scheduler.metrics.prompt_tokens_reused
        start = time.perf_counter()

        def on_event(event, reply=reply, first=first):
            if event.token_id >= 0:
                if not first:
                    first.append(time.perf_counter())
                reply.append(event.token_id)

        scheduler.submit(Request(tuple(prompt), reply_tokens, ignore_eos=True), on_event)
        scheduler.run_until_idle()
        turns.append((len(prompt), first[0] - start, scheduler.metrics.prompt_tokens_reused - before, reply))
        history = prompt + reply
    return turns


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=300)
    ap.add_argument("--message-tokens", type=int, default=100)
    ap.add_argument("--reply-tokens", type=int, default=64)
    ap.add_argument("--interleave-chunk", type=int, default=None)
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    rt = Runtime.from_pretrained(args.model, backend=args.backend, max_batch_size=8, max_seq_len=args.max_seq_len,
                                 interleave_chunk=args.interleave_chunk, threads=args.threads, progress=False)
    rng = random.Random(0)
    vocab = rt.config.vocab_size
    draw = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    system = draw(args.system_tokens)
    messages = [draw(args.message_tokens) for _ in range(args.turns)]
    # a warm-up turn, then each setting once
    conversation(Scheduler(rt), draw(40), [draw(40)], 4)
    runs, kept = {}, {}
    for reuse in (True, False):
        scheduler = _LogitsKept(rt, reuse_prefixes=reuse)
        runs[reuse] = conversation(scheduler, system, messages, args.reply_tokens)
        kept[reuse] = scheduler
    print(f"{args.model}, {args.backend}, {args.threads} threads, interleave chunk {rt.shapes.interleave_chunk}, "
          f"window cache {rt.shapes.window_cache}")
    print("turn  prompt  reused  ttft reuse (s)  ttft no reuse (s)  max |dlogits|")
    first = 0
    for i, (on, off) in enumerate(zip(runs[True], runs[False])):
        pairs = list(zip(kept[True].kept[first:first + len(on[3])], kept[False].kept[first:first + len(off[3])]))
        first += len(on[3])
        worst = max((a - b).abs().max().item() for a, b in pairs) if pairs else 0.0
        print(f"{i + 1:4d}  {on[0]:6d}  {on[2]:6d}  {on[1]:14.3f}  {off[1]:17.3f}  {worst:13.2e}")
    total_on, total_off = sum(t[1] for t in runs[True]), sum(t[1] for t in runs[False])
    same = [t[3] for t in runs[True]] == [t[3] for t in runs[False]]
    print(f"sum of ttft: {total_on:.3f} s with reuse, {total_off:.3f} s without ({total_off / total_on:.2f}x); "
          f"replies identical: {same}")
    explained, rounding = first_difference(kept[True], kept[False])
    print(explained)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"turns": [{"prompt": on[0], "reused": on[2], "ttft_reuse_s": on[1], "ttft_no_reuse_s": off[1]}
                                 for on, off in zip(runs[True], runs[False])],
                       "replies_identical": same, "difference": explained,
                       "interleave_chunk": rt.shapes.interleave_chunk}, f, indent=2)
    return 0 if rounding else 1


if __name__ == "__main__":
    raise SystemExit(main())
