"""Bad input gets an error that names the problem, before anything runs, and the runtime stays usable."""
import pytest

from gptoss.model.loader import load_model
from gptoss.runtime import Runtime


@pytest.fixture(scope="module")
def rt(small_checkpoint):
    return Runtime(load_model(small_checkpoint), small_checkpoint, max_batch_size=2, max_seq_len=64,
                   prefill_chunk=16)


PROMPT = [[5, 6, 7, 8, 9]]


def _reference(rt):
    return rt.generate(PROMPT, max_new_tokens=6)[0].token_ids


@pytest.mark.parametrize("call, error, words", [
    (dict(prompts=[list(range(64))], max_new_tokens=4), ValueError, "max_seq_len"),
    (dict(prompts=[[]], max_new_tokens=4), ValueError, "empty"),
    (dict(prompts=[[1, 2, 300]], max_new_tokens=4), ValueError, "token id 300"),
    (dict(prompts=[[1, -1]], max_new_tokens=4), ValueError, "token id -1"),
    (dict(prompts=PROMPT, max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(prompts=PROMPT, max_new_tokens=-3), ValueError, "max_new_tokens"),
    (dict(prompts=[1, 2, 3], max_new_tokens=4), TypeError, "wrap one token-id prompt"),
    (dict(prompts=[], max_new_tokens=4), TypeError, "non-empty"),
    (dict(prompts=[[1.5, 2]], max_new_tokens=4), TypeError, "prompt 0"),
    (dict(prompts=PROMPT, max_new_tokens=4, temperature=-1.0), ValueError, "temperature"),
    (dict(prompts=PROMPT, max_new_tokens=4, temperature=1.0, top_p=0.0), ValueError, "top_p"),
    (dict(prompts=PROMPT, max_new_tokens=4, temperature=1.0, top_k=0), ValueError, "top_k"),
    (dict(prompts=PROMPT, max_new_tokens=4, stop=[999]), ValueError, "stop token id 999"),
    (dict(prompts=["text"], max_new_tokens=4), ValueError, "tokenizer.json"),
])
def test_bad_input_is_refused_and_runtime_stays_usable(rt, call, error, words):
    before = _reference(rt)
    with pytest.raises(error, match=words):
        rt.generate(**call)
    assert _reference(rt) == before


def test_bad_input_in_stream_mode_raises_at_the_call(rt):
    with pytest.raises(ValueError, match="empty"):
        rt.generate([[]], max_new_tokens=3, stream=True)


def test_long_prompt_is_capped_by_max_seq_len(rt):
    result = rt.generate([list(range(1, 61))], max_new_tokens=50)[0]
    assert len(result.token_ids) == 64 - 60 and result.finish_reason == "length"


def test_more_prompts_than_max_batch_run_in_order(rt):
    prompts = [[3, 4, 5], [9] * 20, [7, 7], [1, 2, 3, 4, 5, 6], [42]]
    together = rt.generate(prompts, max_new_tokens=8)
    assert rt.last_stats.batches == 3
    alone = [rt.generate([p], max_new_tokens=8)[0].token_ids for p in prompts]
    assert [r.token_ids for r in together] == alone


def test_stop_token_ends_generation(rt):
    free = rt.generate(PROMPT, max_new_tokens=10)[0].token_ids
    stop_id = free[3]
    result = rt.generate(PROMPT, max_new_tokens=10, stop=[stop_id])[0]
    assert result.finish_reason == "stop"
    assert result.token_ids == free[:free.index(stop_id) + 1]


def test_stream_yields_the_same_tokens(rt):
    prompts = [[3, 4, 5], [9] * 20]
    results = rt.generate(prompts, max_new_tokens=7)
    events = list(rt.generate(prompts, max_new_tokens=7, stream=True))
    for i, r in enumerate(results):
        mine = [e for e in events if e.index == i]
        assert [e.token_id for e in mine] == r.token_ids
        assert mine[-1].finish_reason == "length" and all(e.finish_reason is None for e in mine[:-1])


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(rt):
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95)
    a = rt.generate(PROMPT * 2, seed=7, **kw)
    b = rt.generate(PROMPT * 2, seed=7, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    greedy = rt.generate(PROMPT, max_new_tokens=12)[0].token_ids
    assert any(r.token_ids != greedy for r in a)


def test_top_k_1_is_greedy(rt):
    greedy = rt.generate(PROMPT, max_new_tokens=8)[0].token_ids
    assert rt.generate(PROMPT, max_new_tokens=8, temperature=0.7, top_k=1, seed=3)[0].token_ids == greedy
