"""Host memory: a model's weights on transparent huge pages, and a malloc that keeps what a step frees.

A decode step streams every weight it uses from memory once (~55 MB a token for the bench preset, ~3.7 GB for
gpt-oss-20b). In 4 KiB pages that is a TLB miss and a page walk every 4 KiB of every stream; in 2 MiB pages one
per 2 MiB. Where transparent huge pages are in "madvise" mode (the default of many distributions, and of the
machines here) only memory advised MADV_HUGEPAGE gets them, and torch's allocator advises none (unless the
process sets THP_MEM_ALLOC_ENABLE=1). So the loader places the weights here, and the KV cache is allocated here.

Each tensor gets its own storage (a slice of the mapping), so tensors never alias: compiled graphs see them as
the separate inputs they were traced with. Where the kernel refuses the advice (THP "never", an old kernel) the
memory is the same, in small pages.
"""
from __future__ import annotations

import ctypes
import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # every tensor starts on a cache line (the kernels' vector loads)


def _aligned(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def nbytes(shape, dtype: torch.dtype) -> int:
    return _aligned(torch.Size(shape).numel() * dtype.itemsize)


class HugePageArena:
    """`nbytes` of host memory starting on a 2 MiB boundary, handed out in order as tensors that read as zeros until
    written (a fresh anonymous mapping, never handed out twice)."""

    def __init__(self, nbytes: int):
        self._map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # private: shmem has its own THP switch
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP compiled out: small pages, same contents
                pass
        start = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr()
        self._next, self._end = (-start) % HUGE_PAGE, (-start) % HUGE_PAGE + nbytes

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        size = nbytes(shape, dtype)
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        if self._next + size > self._end:
            raise MemoryError(f"arena exhausted: {size} bytes asked, {self._end - self._next} left")
        view = memoryview(self._map)[self._next: self._next + size]
        self._next += size
        count = torch.Size(shape).numel()
        return torch.frombuffer(view, dtype=dtype, count=count).view(shape)


def to_host(model: nn.Module, skip: frozenset[str] = frozenset()) -> nn.Module:
    """`model.to_empty(device="cpu")` with every parameter and buffer in one HugePageArena: uninitialised, in
    place of the meta tensors. Parameters shared by two modules share their memory here too. The parameters
    named in `skip` stay on the meta device (the loader puts tensors mapped from the checkpoint there)."""
    skipped = {id(p) for name, p in model.named_parameters() if name in skip}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in skipped}
    arena = HugePageArena(sum(nbytes(t.shape, t.dtype) for t in tensors.values()))
    placed: dict[int, torch.Tensor] = {}

    def place(t: torch.Tensor) -> torch.Tensor:
        if id(t) in skipped:
            return t
        if id(t) not in placed:
            placed[id(t)] = arena.empty(t.shape, t.dtype)
        return placed[id(t)]

    return model._apply(place)  # what to_empty does, with this allocator


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more (64-bit)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS. Returns False where
    the C library has no mallopt (not glibc): nothing changes then.

    By default the first blocks above 128 KiB get their own mmap (unmapped when freed), and a freed heap top above
    twice a moving threshold is trimmed: a graph call's large buffers were then faulted in afresh, page by page,
    every call (bench preset, eager, a 500-token prefill: 51-68k page faults a call, 0.59-0.65 s; with this
    0-1.9k, 0.52 s; AVX2 Zen 3). Blocks up to 32 MiB (glibc's ceiling for the threshold) now come from the heap,
    and the heap keeps up to 2 GiB of free top. Larger blocks are still mapped each time (a batch-8 prefill's
    ~1M faults stay): taking those from the heap too (M_MMAP_MAX=0) grew it by the block on every call when small
    allocations split the freed one. Process-wide: the runtime applies it on CPU unless
    Settings(keep_host_memory=False)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
