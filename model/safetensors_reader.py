"""Read tensors from (possibly sharded) safetensors files one at a time, mapping only the bytes of the tensor
being read and unmapping them right after, so that loading costs the model's own memory plus one tensor.

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
    def open(self, name: str, expected: tuple[int, ...]):
        """A read-only CPU view of the tensor, valid inside the `with` block only (its pages are unmapped
        on exit). Only the pages covering this tensor are mapped."""
        entry = self.check(name, expected)
        page = mmap.ALLOCATIONGRANULARITY
        offset = entry.begin - entry.begin % page
        length = entry.end - offset
        with open(entry.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_COPY, offset=offset)
        try:
            count = (entry.end - entry.begin) // entry.dtype.itemsize
            t = torch.frombuffer(mm, dtype=entry.dtype, count=count, offset=entry.begin - offset) if count else \
                torch.empty(0, dtype=entry.dtype)
            yield t.view(entry.shape)
            del t
        finally:
            try:
                mm.close()
            except BufferError:  # a caller kept a view alive; the mapping goes when it does
                pass
