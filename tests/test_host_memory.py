"""Host memory (model/host_memory.py): weights and KV cache on huge-page-advised memory; freed memory kept for reuse."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gptoss.model.host_memory import HUGE_PAGE, HugePageArena, to_host
from gptoss.model.loader import load_model
from gptoss.runtime import Runtime


def _smaps_field(address: int, field: str) -> list[str]:
    """A field of the mapping holding `address` (Linux /proc/self/smaps), split in words."""
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            mapping = lo <= address < hi
        elif mapping and line.startswith(field + ":"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _vm_flags(address: int) -> list[str]:
    return _smaps_field(address, "VmFlags")


def _resident_bytes(address: int) -> int:
    return int(_smaps_field(address, "Rss")[0]) * 1024


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1: text.index("]")]


def test_arena_tensors_are_aligned_and_never_alias():
    arena = HugePageArena(3 * HUGE_PAGE)
    a = arena.empty((1000, 3), torch.bfloat16)
    b = arena.empty((7,), torch.uint8)
    c = arena.empty((HUGE_PAGE // 8, 2), torch.float32)
    assert a.data_ptr() % HUGE_PAGE == 0, "the first tensor starts the arena, on a huge-page boundary"
    assert all(t.data_ptr() % 64 == 0 for t in (a, b, c))
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (a, b, c))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), "tensors overlap"
    assert len({t.untyped_storage().data_ptr() for t in (a, b, c)}) == 3, "each tensor has its own storage"
    a.fill_(1.5), b.fill_(7), c.fill_(-2)
    assert a.float().sum() == 1.5 * 3000 and b.sum() == 49 and c.sum() == -2 * c.numel()
    assert arena.empty((0, 5), torch.float32).shape == (0, 5)
    with pytest.raises(MemoryError, match="arena exhausted"):
        arena.empty((2 * HUGE_PAGE,), torch.uint8)


def test_a_cache_takes_memory_only_where_it_is_written(small_checkpoint):
    """The KV cache is not zeroed at allocation (its anonymous mapping reads as zeros): a server's rows and slots
    that no sequence reaches take no memory."""
    from gptoss.model.config import GptOssConfig
    from gptoss.model.kv_cache import KVCache
    from gptoss.model.parallel import Parallel, ShardPlan

    config = GptOssConfig.from_pretrained(small_checkpoint)
    plan = ShardPlan.build(config, Parallel())
    cache = KVCache.allocate(config, plan, max_batch_size=8, slots=(1 << 20) // (plan.kv_heads * config.head_dim),
                             dtype=torch.float32, device="cpu")  # 32 MiB a buffer
    keys = cache.keys[0]
    assert _resident_bytes(keys.data_ptr()) <= 2 * HUGE_PAGE < keys.nbytes
    keys[3, 100:200] = 1.0
    assert keys[3, 100:200].sum() == keys[3, 100:200].numel() and keys[3, :100].abs().sum() == 0 == keys[:3].abs().sum()
    assert _resident_bytes(keys.data_ptr()) <= 4 * HUGE_PAGE


def test_to_host_places_every_tensor_and_keeps_shared_ones_shared():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(300, 200), nn.LayerNorm(200), nn.Linear(200, 300))
        model[2].weight = nn.Parameter(torch.empty(300, 200, dtype=torch.bfloat16))
        model.register_buffer("table", torch.empty(17))
        model[1].weight = model[0].bias  # shared: one tensor, two modules
    model = to_host(model)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)
    assert model[1].weight.data_ptr() == model[0].bias.data_ptr()
    assert model[2].weight.dtype == torch.bfloat16 and model[2].weight.shape == (300, 200)
    assert _vm_flags(model[0].weight.data_ptr())  # host memory of this process
    for t in tensors:
        t.data.fill_(0.5)
    assert model[2].weight.sum() == 0.5 * 300 * 200 and model.table.sum() == 0.5 * 17


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="transparent huge pages are off on this machine")
def test_loaded_weights_and_cache_are_advised_as_huge_pages(small_checkpoint):
    model = load_model(small_checkpoint)
    rt = Runtime(model, small_checkpoint, max_batch_size=2, max_seq_len=64, backend="eager", progress=False)
    for t in (model.lm_head, model.layers[0].self_attn.qkv_proj.weight, rt.cache.keys[0], rt.cache.values[-1]):
        assert "hg" in _vm_flags(t.data_ptr()), "not advised MADV_HUGEPAGE"
    assert rt.cache.keys[0].abs().sum() == 0, "the cache starts zeroed"
    out = rt.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)[0].token_ids
    plain = load_model(small_checkpoint)
    for p in plain.parameters():
        p.data = p.data.clone()  # torch's allocator
    assert "hg" not in _vm_flags(plain.lm_head.data_ptr())
    ref = Runtime(plain, small_checkpoint, max_batch_size=2, max_seq_len=64, backend="eager", progress=False)
    assert out == ref.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)[0].token_ids


_REUSE = """
import resource, torch
from gptoss.model.host_memory import keep_freed_memory
applied = keep_freed_memory()
def faults():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt
def step():  # two 20 MiB buffers at once, as a step's intermediates
    buffers = [torch.empty(20 << 20, dtype=torch.uint8) for _ in range(2)]
    for b in buffers:
        b.fill_(1)
    del buffers, b
for _ in range(3):  # the heap grows until the buffer and what lives beside it fit
    step()
counts = []
for _ in range(6):
    before = faults()
    step()
    counts.append(faults() - before)
print(applied, min(counts))
"""


def test_freed_memory_is_reused_without_page_faults():
    """Buffers freed and allocated again (as every graph call's are) are not faulted in again: glibc would map
    the first ones on their own and then trim the freed heap top (over 2 x its moving mmap threshold: here 40 MiB
    over 2 x 20), faulting in their 10,240 pages every step. In a fresh process, once the heap holds them (in a
    long one other allocations may split the freed blocks)."""
    out = subprocess.run([sys.executable, "-c", _REUSE], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("the C library has no mallopt (not glibc)")
    assert int(out[1]) < 1000
