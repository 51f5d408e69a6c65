"""Numerical parity with transformers.GptOssForCausalLM (fp32, CPU, eager attention)."""
import pytest
import torch
import transformers

from gptoss.model.kv_cache import KVCache
from gptoss.model.loader import load_model
from gptoss.runtime import Runtime

PREFILL = 45  # crosses every sliding window in the configs
DECODE = 30


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    ref = transformers.GptOssForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).eval()
    return ref, load_model(hf_checkpoint)


def test_prefill_and_teacher_forced_decode_logits(pair):
    ref, model = pair
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, PREFILL + DECODE), generator=g)
    with torch.no_grad():
        expected = ref(ids).logits
        cache = KVCache.allocate(model.config, model.plan, 2, 128, torch.float32)
        got = model.prefill(ids[:, :PREFILL], torch.zeros(2, dtype=torch.long),
                            torch.full((2,), PREFILL - 1), cache.keys, cache.values, 128)
        assert (got - expected[:, PREFILL - 1]).abs().max() <= 1e-4
        worst = 0.0
        for t in range(PREFILL, PREFILL + DECODE):
            got = model.decode(ids[:, t], torch.full((2,), t), cache.keys, cache.values, 128)
            worst = max(worst, (got - expected[:, t]).abs().max().item())
        assert worst <= 1e-4, worst


def test_chunked_prefill_matches_one_pass(pair):
    """A prompt split across several static chunks gives the same last-token logits."""
    ref, model = pair
    ids = torch.randint(0, model.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits[:, -1]
        cache = KVCache.allocate(model.config, model.plan, 1, 64, torch.float32)
        for start in (0, 16, 32):
            got = model.prefill(ids[:, start:start + 16], torch.tensor([start]), torch.tensor([15]),
                                cache.keys, cache.values, 64)
        got = model.prefill(torch.nn.functional.pad(ids[:, 48:], (0, 14)), torch.tensor([48]), torch.tensor([1]),
                            cache.keys, cache.values, 64)
    assert (got - expected).abs().max() <= 1e-4


def _hf_greedy(ref, prompt, n):
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("lengths", [(41,), (41, 9, 23)], ids=["batch1", "batch3-mixed"])
def test_greedy_generate_matches_transformers(pair, hf_checkpoint, lengths):
    ref, _ = pair
    rt = Runtime(pair[1], hf_checkpoint, max_batch_size=4, max_seq_len=128, prefill_chunk=32)
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(0, rt.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    results = rt.generate(prompts, max_new_tokens=32)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == _hf_greedy(ref, prompt, 32)
        assert result.finish_reason == "length"


# -- sliding layers on a ring cache (window + chunk slots, written at position mod ring) ------------------------
@pytest.mark.parametrize("chunk", [4, 8, 16, 32])
def test_ring_cache_matches_transformers(pair, chunk, one_thread):
    """Prompts crossing the ring's wrap-around several times (two rows of different lengths, chunked, padded with
    zeros), then teacher-forced decode steps past several more wraps: every logit within 1e-4 of transformers."""
    from gptoss.graph import ShapePlan
    ref, model = pair
    window = model.config.sliding_window
    if chunk not in (window // 2, window, 2 * window) and not (window % 2 and chunk in (4, 8)):
        pytest.skip("the window against this chunk is covered by another size")
    ring = ShapePlan(2, 4096, chunk, window=window).window_slots
    assert ring == window + chunk - 1
    prompt, decode = (3 * ring + 2, 3 * ring - 5), 2 * ring + 1  # wraps: 3 in prefill, 2 more in decode
    total = prompt[0] + decode
    slots = -(-total // 64) * 64  # full layers: a linear cache just longer than the sequence (kv_len reads it all)
    ids = torch.randint(1, model.config.vocab_size, (2, total), generator=torch.Generator().manual_seed(chunk))
    with torch.no_grad():
        expected = ref(ids).logits
        cache = KVCache.allocate(model.config, model.plan, 2, slots, torch.float32, window_slots=ring)
        assert {k.shape[1] for k in cache.keys} == {ring, slots}
        lengths = torch.tensor(prompt)
        padded = torch.zeros(2, -(-prompt[0] // chunk) * chunk, dtype=torch.long)
        for r, n in enumerate(prompt):
            padded[r, :n] = ids[r, :n]
        worst = 0.0
        for done in range(0, prompt[0], chunk):
            last = (lengths - 1 - done).clamp(0, chunk - 1)
            start = torch.full((2,), done).minimum(lengths)  # as the runtime: an ended prompt stays put
            got = model.prefill(padded[:, done:done + chunk], start, last, cache.keys, cache.values, slots)
            for r in range(2):
                if done <= int(lengths[r]) - 1:  # a row past its prompt computes padding: nothing to compare
                    worst = max(worst, (got[r] - expected[r, done + int(last[r])]).abs().max().item())
        pos = lengths.clone()
        for _ in range(decode):
            got = model.decode(ids[torch.arange(2), pos], pos, cache.keys, cache.values, slots)
            worst = max(worst, (got - expected[torch.arange(2), pos]).abs().max().item())
            pos = pos + 1
    assert worst <= 1e-4, worst
