"""Read tensors from (possibly sharded) safetensors files one at a time, mapping only the bytes of the tensor
being read and unmapping them right after, so that loading costs the model's own memory plus one tensor. A
tensor-parallel rank maps only its own rows of an outer-dimension split, and expert tensors one expert at a time
(see `SafetensorsReader.open`). A tensor whose in-memory form is its bytes in the file can instead be used in
place (`SafetensorsReader.map`): no copy at all.

(The `safetensors` library keeps the whole file mapped while a handle is open, and every page it touches counts
toward the process's resident memory until the handle closes: loading a 1 GB file would then peak near 2x.)

Every header is checked in full when the reader is made, before anything is mapped: a file that is truncated, is
not safetensors, or whose header disagrees with its data (sizes, offsets, overlaps, holes) raises CheckpointError
naming the file, as does an index that names a missing shard or a tensor its shard does not hold.
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CheckpointError, json_kind, parse_json, read_json_object

INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; a larger length means this is not safetensors

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# In the format but not readable here (no torch dtype on every supported version, or not used by GPT-OSS).
_OTHER_FORMAT_DTYPES = {"U16", "U32", "U64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"}

__all__ = ["CheckpointError", "SafetensorsReader", "INDEX"]


_MADV_POPULATE_READ = 22  # Linux 5.14+: fault the range in now, reading the file where it is not cached


def _advise(mapped: mmap.mmap, advice: int | None, *span: int) -> bool:
    """madvise, where the system has it; False where it does not (or refuses the advice)."""
    if advice is None:
        return False
    try:
        mapped.madvise(advice, *span)
    except (OSError, ValueError):
        return False
    return True


def _read_ahead(fd: int, mapped: mmap.mmap, end: int, size: int) -> None:
    """Ask the kernel for the mapped bytes now, and for the next `size` bytes of the file after `end` (what a
    loader reads next: the next expert of a tensor, the next tensor), so the disk works while the caller copies.
    A cold 4.6 GB shard, tensor by tensor on a 2-core VM: faulted in page by page 390 MB/s, with the first advice
    alone 734, the second alone 918 (BENCHMARKS.md). Only advice: where the system has none, nothing changes."""
    _advise(mapped, getattr(mmap, "MADV_WILLNEED", None))
    if size and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, end, size, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


class TensorEntry:
    __slots__ = ("file", "name", "dtype", "shape", "begin", "end")

    def __init__(self, file: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int):
        self.file, self.name, self.dtype, self.shape, self.begin, self.end = file, name, dtype, shape, begin, end


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, name: str, meta, data_start: int) -> TensorEntry:
    """One header entry, checked against the format: offsets are relative to the data area and span exactly
    numel * itemsize bytes."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: header entry is {json_kind(meta)}, not an object")
    keys = {"dtype", "shape", "data_offsets"}
    if set(meta) != keys:
        missing, extra = sorted(keys - set(meta)), sorted(set(meta) - keys)
        raise CheckpointError(f"{where}: header entry " + (f"lacks {missing}" if missing else f"has unknown {extra}"))
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        kind = "unsupported" if isinstance(dtype, str) and dtype in _OTHER_FORMAT_DTYPES else "unknown"
        raise CheckpointError(f"{where}: {kind} dtype {dtype if isinstance(dtype, str) else json_kind(dtype)} "
                              f"(readable: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, found {shape!r:.60}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                              f"found {offsets!r:.60}")
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * _DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{where}: header inconsistent with the data: shape {shape} of {dtype} is {nbytes} "
                              f"bytes but data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return TensorEntry(path, name, _DTYPES[dtype], tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of one safetensors file, its header validated against the file's size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated or not safetensors: {size} bytes, fewer than the 8 "
                                      "of the header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (its first 8 bytes give a header length "
                                      f"of {length} bytes)")
            if 8 + length > size:
                raise CheckpointError(f"{path}: truncated: the header length says {length} bytes of header but "
                                      f"the file has {size - 8} bytes after it")
            raw = f.read(length)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {e.strerror or e}") from e
    header = parse_json(raw, f"{path} (safetensors header)")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors header: JSON {json_kind(header)}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, found {metadata!r:.60}")
    data_start, data_len = 8 + length, size - 8 - length
    entries = {name: _parse_entry(path, name, meta, data_start) for name, meta in header.items()}
    _check_layout(path, entries, data_start, data_len)
    return entries


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_start: int, data_len: int) -> None:
    """The tensors must tile the data area exactly, as the format requires: no overlaps, holes or extra bytes."""
    ordered = sorted(entries.values(), key=lambda e: (e.begin, e.end))
    described = max((e.end for e in ordered), default=data_start) - data_start
    if described > data_len:
        last = max(ordered, key=lambda e: e.end)
        raise CheckpointError(f"{path}: truncated: tensor '{last.name}' ends at byte {described} of the data area "
                              f"but the file holds {data_len} bytes of data")
    expected, previous = data_start, None
    for e in ordered:
        if e.begin < expected:
            raise CheckpointError(f"{path}: header inconsistent with the data: tensors '{previous}' and '{e.name}' "
                                  "overlap")
        if e.begin > expected:
            raise CheckpointError(f"{path}: header inconsistent with the data: {e.begin - expected} bytes before "
                                  f"tensor '{e.name}' belong to no tensor")
        expected, previous = e.end, e.name
    if described < data_len:
        raise CheckpointError(f"{path}: header inconsistent with the data: the file has {data_len - described} "
                              "bytes after the last tensor")


def _read_index(index: Path) -> dict[str, str]:
    """tensor name -> shard file name, as `model.safetensors.index.json` maps them."""
    doc = read_json_object(index)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file, "
                              f"found {json_kind(weight_map)}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index}: tensor '{name}' is mapped to {json_kind(shard)}, not a file name in "
                                  "the checkpoint directory")
    return weight_map


class SafetensorsReader:
    """Index of every tensor in a checkpoint directory (single file or `model.safetensors.index.json`)."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / INDEX
        self.entries: dict[str, TensorEntry] = {}
        self._maps: dict[Path, mmap.mmap] = {}  # whole files mapped for `map`
        if index.is_file():
            self.source = index
            self._read_sharded(model_dir, index)
            return
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {model_dir}")
        self.source = files[0] if len(files) == 1 else model_dir
        for path in files:
            for name, entry in read_header(path).items():
                if name in self.entries:
                    raise CheckpointError(f"{path}: tensor '{name}' is also in {self.entries[name].file.name} "
                                          f"(and {model_dir} has no {INDEX} to say which one is meant)")
                self.entries[name] = entry

    def _read_sharded(self, model_dir: Path, index: Path) -> None:
        weight_map = _read_index(index)
        for shard in sorted(set(weight_map.values())):
            path = model_dir / shard
            if not path.is_file():
                raise CheckpointError(f"{index}: names shard '{shard}', which is not in {model_dir}")
            held = read_header(path)
            for name, entry in held.items():
                if weight_map.get(name) != shard:
                    where = f"maps it to '{weight_map[name]}'" if name in weight_map else "does not list it"
                    raise CheckpointError(f"{path}: holds tensor '{name}' but {index.name} {where}")
                self.entries[name] = entry
        absent = sorted(name for name in weight_map if name not in self.entries)
        if absent:
            raise CheckpointError(f"{index}: maps tensor '{absent[0]}' to '{weight_map[absent[0]]}', which does not "
                                  f"hold it ({len(absent)} such tensor(s))")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> set[str]:
        return set(self.entries)

    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(e.end - e.begin for e in self.entries.values())

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise CheckpointError(f"checkpoint tensor '{name}' is missing from {self.source}")
        return self.entries[name]

    def check(self, name: str, expected: tuple[int, ...]) -> TensorEntry:
        entry = self._entry(name)
        if entry.shape != tuple(expected):
            raise CheckpointError(f"checkpoint tensor '{name}' in {entry.file} has shape {list(entry.shape)}, "
                                  f"expected {list(expected)} from config.json")
        return entry

    def _span(self, name: str, expected: tuple[int, ...], index: tuple[int, ...],
              rows: tuple[int, int] | None) -> tuple[TensorEntry, int, int, tuple[int, ...]]:
        """(entry, first byte, end byte, shape) of `tensor[index][rows[0]:rows[1]]`: one contiguous byte range."""
        entry = self.check(name, expected)
        shape = entry.shape
        if len(index) > len(shape) or any(not 0 <= i < n for i, n in zip(index, shape)):
            raise IndexError(f"index {index} out of range for '{name}' of shape {list(shape)}")
        shape = shape[len(index):]
        if rows is not None:
            if not shape or not 0 <= rows[0] <= rows[1] <= shape[0]:
                raise IndexError(f"rows {rows} out of range for '{name}'{list(index)} of shape {list(shape)}")
        row = entry.dtype.itemsize
        for n in shape[1:]:
            row *= n
        inner = row * (shape[0] if shape else 1)  # bytes of one tensor[index]
        first = 0
        for i, n in zip(index, entry.shape):
            first = first * n + i
        begin = entry.begin + first * inner
        end = begin + inner
        if rows is not None:
            begin, end = begin + rows[0] * row, begin + rows[1] * row
            shape = (rows[1] - rows[0], *shape[1:])
        return entry, begin, end, shape

    @contextmanager
    def open(self, name: str, expected: tuple[int, ...], index: tuple[int, ...] = (),
             rows: tuple[int, int] | None = None):
        """A read-only CPU view of the tensor, valid inside the `with` block only (its pages are unmapped
        on exit). Only the pages covering the bytes returned are mapped.

        `index` fixes leading dimensions and `rows = (start, stop)` narrows the next one: the view is
        `tensor[index][start:stop]`, which is one contiguous byte range of the file, so a tensor-parallel rank
        maps (and reads) only its own rows of a tensor split along its outer dimension, or one expert at a time.
        """
        entry, begin, end, shape = self._span(name, expected, index, rows)
        count = (end - begin) // entry.dtype.itemsize
        if count == 0:
            yield torch.empty(shape, dtype=entry.dtype)
            return
        page = mmap.ALLOCATIONGRANULARITY
        offset = begin - begin % page
        try:
            with open(entry.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), end - offset, access=mmap.ACCESS_COPY, offset=offset)
                # the bytes after a rank's rows are another rank's: only a whole tensor[index] reads on
                _read_ahead(f.fileno(), mm, end, end - begin if rows is None else 0)
        except (OSError, ValueError) as e:  # the header was checked against the file: it changed since
            raise CheckpointError(f"{entry.file}: cannot map tensor '{name}' (bytes {begin}..{end}): {e}; was the "
                                  "file changed while loading?") from e
        try:
            t = torch.frombuffer(mm, dtype=entry.dtype, count=count, offset=begin - offset)
            yield t.view(shape)
            del t
        finally:
            try:
                mm.close()
            except BufferError:  # a caller kept a view alive; the mapping goes when it does
                pass

    def map(self, name: str, expected: tuple[int, ...], rows: tuple[int, int] | None = None) -> torch.Tensor:
        """`tensor[rows[0]:rows[1]]` (or the whole tensor) used in place: a view of the file's pages, no copy,
        valid for as long as the tensor lives. The pages are the page cache's, so they stay cached between
        processes and the process's own memory holds no second copy. They are read in now (where not cached),
        so that a first step does not wait for the disk. The mapping asks for huge pages, which the kernel gives
        where the file's page cache holds 2 MiB folios (ext4 and XFS on recent Linux). Read-only: writing
        through the tensor faults. The file must not change while the tensor lives (as with llama.cpp's mmap)."""
        entry, begin, end, shape = self._span(name, expected, (), rows)
        mapped = self._maps.get(entry.file)
        if mapped is None:
            try:
                with open(entry.file, "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{entry.file}: cannot map it: {e}") from e
            _advise(mapped, getattr(mmap, "MADV_HUGEPAGE", None))
            self._maps[entry.file] = mapped
        if end > len(mapped):  # the header was checked against the file: it changed since
            raise CheckpointError(f"{entry.file}: tensor '{name}' ends at byte {end}, but the file now has "
                                  f"{len(mapped)}; was the file changed while loading?")
        first = begin - begin % mmap.PAGESIZE
        if end > first and not _advise(mapped, _MADV_POPULATE_READ, first, end - first):
            _advise(mapped, getattr(mmap, "MADV_WILLNEED", None), first, end - first)  # (before Linux 5.14)
        with warnings.catch_warnings():  # read-only memory, as the docstring says
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            t = torch.frombuffer(mapped, dtype=entry.dtype, count=(end - begin) // entry.dtype.itemsize,
                                 offset=begin) if end > begin else torch.empty(0, dtype=entry.dtype)
        return t.view(shape)
