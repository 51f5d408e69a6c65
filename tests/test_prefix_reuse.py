"""Prompt prefixes served from a cache row (runtime/prefix_reuse.py): a chat's next turn, a regenerated reply, a
prompt sharing another's beginning (a free row's, or a running row's: copied) skip prefilling what a row holds,
and their greedy tokens equal `Runtime.generate` of the whole prompt on a cache of its own, with full-length and
ring caches, with and without mixed steps, while other rows decode beside them."""
from __future__ import annotations

import pytest

from gptoss.runtime import Runtime
from gptoss.runtime.prefix_reuse import PrefixReuse, RowMemory
from gptoss.runtime.scheduler import Request, Scheduler
from gptoss.tools.make_checkpoint import make_checkpoint

# tiny: window 8; interleave chunk 16 (where a reused prefix may end), rings of 8 + 32 - 1 slots
SETTINGS = dict(max_batch_size=4, max_seq_len=256, prefill_chunk=32, interleave_chunk=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("reuse") / "tiny", "tiny")


@pytest.fixture(scope="module")
def ref(ckpt):
    return Runtime.from_pretrained(ckpt, progress=False, window_cache="full", **SETTINGS)


@pytest.fixture(scope="module", params=["ring", "full", "ring-mixed"])
def rt(ckpt, request):
    return Runtime.from_pretrained(ckpt, progress=False, window_cache=request.param.split("-")[0],
                                   mixed_steps=request.param.endswith("mixed"), **SETTINGS)


def prompt(n: int, seed: int) -> list[int]:
    return [(seed * 131 + 17 * i) % 1000 + 1 for i in range(n)]


def serve(scheduler: Scheduler, *requests: Request) -> list[list[int]]:
    outs = [[] for _ in requests]
    for out, req in zip(outs, requests):
        scheduler.submit(req, lambda e, out=out: out.append(e.token_id) if e.token_id >= 0 else None)
    scheduler.run_until_idle()
    return outs


def expect(ref: Runtime, req: Request) -> list[int]:
    return ref.generate([list(req.prompt)], max_new_tokens=req.max_tokens, ignore_eos=True)[0].token_ids


def request(tokens, max_tokens) -> Request:
    return Request(tuple(tokens), max_tokens, ignore_eos=True)


def test_next_turn_and_regenerate_equal_generate(rt, ref):
    scheduler = Scheduler(rt)
    align = scheduler.reuse.align
    first = request(prompt(40, 1), 60)  # a long reply: the rings move far past the prompt
    [reply] = serve(scheduler, first)
    assert reply == expect(ref, first)

    # the next turn: the conversation so far (part of the reply) and a new message
    turn = request(list(first.prompt) + reply[:12] + prompt(7, 2), 20)
    before = scheduler.metrics.prompt_tokens_reused
    [out] = serve(scheduler, turn)
    assert out == expect(ref, turn)
    reused = scheduler.metrics.prompt_tokens_reused - before
    live = (40 + 12) // align * align  # the rings still hold its window: all of the common prefix
    assert reused == (live if rt.shapes.window_cache == "full" else 39 // align * align)

    # the same prompt again (a regenerated reply): its window comes back from the saved ring slots
    before = scheduler.metrics.prompt_tokens_reused
    [again] = serve(scheduler, turn)
    assert again == out
    assert scheduler.metrics.prompt_tokens_reused - before == (len(turn.prompt) - 1) // align * align


def test_reuse_beside_other_rows(rt, ref):
    """A remembered row stays intact while it idles in the decode bucket beside a running request (its dummy
    writes land past what it holds), and a newcomer beside running rows resumes on it."""
    scheduler = Scheduler(rt)
    short, long_ = request(prompt(35, 3), 5), request(prompt(20, 4), 80)
    outs = serve(scheduler, short, long_)  # short ends first; row 0 then idles while long_ decodes
    assert outs == [expect(ref, short), expect(ref, long_)]
    follow = request(list(short.prompt) + outs[0] + prompt(9, 5), 12)
    busy = request(prompt(30, 6), 40)
    before = scheduler.metrics.prompt_tokens_reused
    got = serve(scheduler, busy, follow)
    assert got == [expect(ref, busy), expect(ref, follow)]
    assert scheduler.metrics.prompt_tokens_reused - before >= 32 // scheduler.reuse.align * scheduler.reuse.align > 0


def test_running_row_lends_its_prefix(rt, ref):
    """A newcomer whose prompt begins with what a running row holds copies those positions (and the rings) to its
    own row instead of computing them; both keep to `Runtime.generate`."""
    scheduler = Scheduler(rt)
    align = scheduler.reuse.align
    base = prompt(70, 3)
    first, outs = request(base, 30), [[], []]
    scheduler.submit(first, lambda e: outs[0].append(e.token_id) if e.token_id >= 0 else None)
    while len(outs[0]) < 3:  # its prompt is in and it decodes
        scheduler.step()
    before = scheduler.metrics.prompt_tokens_reused
    second = request(base + prompt(9, 4), 12)
    scheduler.submit(second, lambda e: outs[1].append(e.token_id) if e.token_id >= 0 else None)
    scheduler.run_until_idle()
    assert outs == [expect(ref, first), expect(ref, second)]
    assert scheduler.metrics.prompt_tokens_reused - before == 70 // align * align

    # a row that has decoded past its rings' reach lends nothing to a ring cache (a full cache still lends)
    third, outs = request(prompt(70, 8), 60), [[], []]
    scheduler.submit(third, lambda e: outs[0].append(e.token_id) if e.token_id >= 0 else None)
    while len(outs[0]) < 50:
        scheduler.step()
    before = scheduler.metrics.prompt_tokens_reused
    fourth = request(list(third.prompt) + prompt(9, 9), 12)
    scheduler.submit(fourth, lambda e: outs[1].append(e.token_id) if e.token_id >= 0 else None)
    scheduler.run_until_idle()
    assert outs == [expect(ref, third), expect(ref, fourth)]
    lent = scheduler.metrics.prompt_tokens_reused - before
    assert lent == (70 // align * align if rt.shapes.window_cache == "full" else 0)


def test_same_beginnings_wait_for_one_prefill(rt, ref):
    """Requests that arrive together with the same long beginning (n choices, a shared system prompt) wait for
    the first one's prefill and copy its positions, rather than computing them side by side."""
    scheduler = Scheduler(rt)
    align = scheduler.reuse.align
    shared = prompt(70, 5)
    reqs = [request(shared, 10), request(shared, 10), request(shared + prompt(5, 6), 10), request(prompt(20, 7), 10)]
    graphs = rt.graphs.calls
    assert serve(scheduler, *reqs) == [expect(ref, r) for r in reqs]
    assert scheduler.metrics.prompt_tokens_reused == 69 // align * align + 70 // align * align
    assert rt.graphs.calls > graphs


def test_disabled_reuses_nothing(ckpt, ref):
    rt = Runtime.from_pretrained(ckpt, progress=False, **SETTINGS)
    scheduler = Scheduler(rt, reuse_prefixes=False)
    first = request(prompt(40, 7), 10)
    [reply] = serve(scheduler, first)
    turn = request(list(first.prompt) + reply + prompt(5, 8), 10)
    assert serve(scheduler, turn) == [expect(ref, turn)]
    assert scheduler.metrics.prompt_tokens_reused == 0
    assert "gptoss_prompt_tokens_reused_total 0" in scheduler.metrics.render()


class _Cache:  # the shape of KVCache that PrefixReuse reads, without buffers
    max_batch_size, slots, keys = 2, 256, []


class _Shapes:
    prefill_chunk, interleave_chunk, mixed, window, window_slots = 32, 16, False, 8, 39


@pytest.mark.parametrize("tokens,written_end,saved_at,prompt_len,common,want", [
    (50, 50, 0, 80, 50, (48, False)),  # live: the rings hold 40..47
    (50, 90, 0, 80, 50, (0, False)),  # the rings moved on, nothing saved
    (50, 90, 32, 80, 50, (32, True)),  # ... but the window before 32 was saved
    (50, 90, 32, 80, 20, (0, False)),  # 16 would need 8..15, gone from the rings; 32 is past the common part
    (50, 50, 0, 48, 48, (32, False)),  # the same 48 tokens: one is left to compute, so 47 -> 32
    (10, 10, 0, 80, 10, (0, False)),  # less than one alignment step in common
])
def test_resume_points(tokens, written_end, saved_at, prompt_len, common, want):
    reuse = PrefixReuse(_Cache(), _Shapes())
    held = list(range(1, tokens + 1))
    new = held[:common] + [0] * (prompt_len - common)
    memory = RowMemory(held, written_end, saved_at=saved_at)
    assert reuse._resume_at(memory, new) == want


@pytest.mark.parametrize("a,b,want", [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2),
                                      (list(range(1000)), list(range(700)) + [0], 700),
                                      (list(range(600)), list(range(600)) + [5], 600), ([4], [5], 0)])
def test_common_prefix(a, b, want):
    from gptoss.runtime.prefix_reuse import common_prefix
    assert common_prefix(a, b) == want == common_prefix(b, a)
