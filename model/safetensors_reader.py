"""Read tensors from (possibly sharded) safetensors files one at a time, mapping only the bytes of the tensor
being read and unmapping them right after, so that loading costs the model's own memory plus one tensor. A
tensor-parallel rank maps only its own rows of an outer-dimension split, and expert tensors one expert at a time
(see `SafetensorsReader.open`).

(The `safetensors` library keeps the whole file mapped while a handle is open, and every page it touches counts
toward the process's resident memory until the handle closes: loading a 1 GB file would then peak near 2x.)
"""
from __future__ import annotations

import json
import mmap
import struct
from contextlib import contextmanager
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint tensor that is missing, misshapen, or of an unknown kind."""


class TensorEntry:
    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file: Path, meta: dict, data_start: int, name: str):
        if meta["dtype"] not in _DTYPES:
            raise CheckpointError(f"tensor '{name}' in {file.name} has unsupported dtype {meta['dtype']}")
        self.file, self.dtype, self.shape = file, _DTYPES[meta["dtype"]], tuple(meta["shape"])
        self.begin, self.end = data_start + meta["data_offsets"][0], data_start + meta["data_offsets"][1]


def _read_header(path: Path) -> dict[str, TensorEntry]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {name: TensorEntry(path, meta, 8 + size, name) for name, meta in header.items()}


class SafetensorsReader:
    """Index of every tensor in a checkpoint directory (single file or `model.safetensors.index.json`)."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {model_dir}")
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            path = model_dir / name
            if not path.is_file():
                raise CheckpointError(f"{path} is listed in the index but does not exist")
            self.entries.update(_read_header(path))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise CheckpointError(f"checkpoint tensor '{name}' is missing")
        return self.entries[name]

    def check(self, name: str, expected: tuple[int, ...]) -> TensorEntry:
        entry = self._entry(name)
        if entry.shape != tuple(expected):
            raise CheckpointError(
                f"checkpoint tensor '{name}' has shape {list(entry.shape)}, expected {list(expected)}")
        return entry

    @contextmanager
    def open(self, name: str, expected: tuple[int, ...], index: tuple[int, ...] = (),
             rows: tuple[int, int] | None = None):
        """A read-only CPU view of the tensor, valid inside the `with` block only (its pages are unmapped
        on exit). Only the pages covering the bytes returned are mapped.

        `index` fixes leading dimensions and `rows = (start, stop)` narrows the next one: the view is
        `tensor[index][start:stop]`, which is one contiguous byte range of the file, so a tensor-parallel rank
        maps (and reads) only its own rows of a tensor split along its outer dimension, or one expert at a time.
        """
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
        count = (end - begin) // entry.dtype.itemsize
        if count == 0:
            yield torch.empty(shape, dtype=entry.dtype)
            return
        page = mmap.ALLOCATIONGRANULARITY
        offset = begin - begin % page
        with open(entry.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), end - offset, access=mmap.ACCESS_COPY, offset=offset)
        try:
            t = torch.frombuffer(mm, dtype=entry.dtype, count=count, offset=begin - offset)
            yield t.view(shape)
            del t
        finally:
            try:
                mm.close()
            except BufferError:  # a caller kept a view alive; the mapping goes when it does
                pass
