"""Several callers, one runtime: each `generate` gets exactly what it would get alone, whatever other threads do,
and a generation interrupted by the caller (an exception, KeyboardInterrupt, an abandoned stream) leaves the
runtime usable. Without the runtime's turn-taking, the threaded test fails almost every round (the cache and
static buffers are shared; measured: 5 of 5 rounds of four threads differed)."""
import threading

import pytest

from gptoss.model.loader import load_model
from gptoss.runtime import Runtime
from gptoss.tools.make_checkpoint import make_checkpoint

PROMPTS = [[[5, 6, 7, 8]], [[9, 10, 11]], [[20, 21, 22, 23, 24, 25]], [[3, 1, 4, 1, 5]]]
ROUNDS = 5


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    # the tiny preset: big enough that threads interleave inside a generation (the small test configs finish a
    # step within one GIL slice and rarely race)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("concurrency") / "tiny", "tiny", layout="mxfp4")
    return Runtime(load_model(ckpt), ckpt, max_batch_size=2, max_seq_len=64, prefill_chunk=16)


@pytest.fixture(scope="module")
def alone(rt):
    return [rt.generate(p, max_new_tokens=12)[0].token_ids for p in PROMPTS]


def _threaded(rt, stream: bool) -> list[list[int]]:
    results, errors = [None] * len(PROMPTS), []

    def call(i):
        try:
            if stream:
                results[i] = [e.token_id for e in rt.generate(PROMPTS[i], max_new_tokens=12, stream=True)]
            else:
                results[i] = rt.generate(PROMPTS[i], max_new_tokens=12)[0].token_ids
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


@pytest.mark.parametrize("stream", [False, True], ids=["lists", "streams"])
def test_threads_get_what_they_would_get_alone(rt, alone, stream):
    for _ in range(ROUNDS):
        assert _threaded(rt, stream) == alone


def test_abandoned_stream_then_another_call(rt, alone):
    stream = rt.generate(PROMPTS[0], max_new_tokens=12, stream=True)
    first = [next(stream).token_id for _ in range(3)]
    assert first == alone[0][:3]
    # the same thread starts another call while its stream is unfinished: the stream is ended, the call runs
    assert rt.generate(PROMPTS[1], max_new_tokens=12)[0].token_ids == alone[1]
    with pytest.raises(RuntimeError, match="left unfinished"):
        next(stream)
    # a stream dropped half-way by another thread gives the runtime back
    def abandon():
        s = rt.generate(PROMPTS[2], max_new_tokens=12, stream=True)
        next(s)
    t = threading.Thread(target=abandon)
    t.start()
    t.join(timeout=60)
    assert rt.generate(PROMPTS[3], max_new_tokens=12)[0].token_ids == alone[3]


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_interrupted_in_the_callers_loop(rt, alone, interrupt):
    with pytest.raises(interrupt):
        for i, _ in enumerate(rt.generate(PROMPTS[2], max_new_tokens=12, stream=True)):
            if i == 4:
                raise interrupt("the caller gave up")
    assert rt.generate(PROMPTS[2], max_new_tokens=12)[0].token_ids == alone[2]
    assert _threaded(rt, False) == alone


def test_interrupted_inside_a_step(rt, alone, monkeypatch):
    """KeyboardInterrupt arriving while the runtime computes (Ctrl-C mid-step): the next call starts clean."""
    calls = {"n": 0}
    decode = rt._decode

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return decode(*args)

    monkeypatch.setattr(rt, "_decode", flaky)
    with pytest.raises(KeyboardInterrupt):
        rt.generate(PROMPTS[0], max_new_tokens=12)
    monkeypatch.undo()
    assert rt.generate(PROMPTS[0], max_new_tokens=12)[0].token_ids == alone[0]
    assert rt.generate(PROMPTS[1], max_new_tokens=12, stream=True) is not None
