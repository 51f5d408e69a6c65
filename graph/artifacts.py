"""The artifact directory: where compiled graphs live on disk, and the manifest that guards their reuse.

One class owns the layout, for every backend and every rank:

    <root>/tp<N>-rank<r>/manifest.json      what the graphs were built for (key), and their files
    <root>/tp<N>-rank<r>/inductor/...       inductor graphs and the kernel cache they need
    <root>/tp<N>-rank<r>/torchair/<graph>/  torchair's cache, one directory per graph

A graph is only valid for the exact model code, config, dtype, static shapes, tensor-parallel rank, backend and
library versions it was built from; torch's own serialised graphs skip their guards on load, so the manifest is
the guard: a directory whose key differs is refused (with the fields that differ) or rebuilt, never run. The
manifest also records the shape settings, so a later process reads them back instead of being told them again.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .shapes import ShapePlan

MANIFEST = "manifest.json"
# What a captured graph is made of: the model package (its op tables included) and graph/'s capture code. Hashed
# by path inside the package, so an editable and a regular install of the same sources give the same hash.
CODE_PACKAGES = ("gptoss.model", "gptoss.graph")
CODE_SUFFIXES = (".py", ".cpp", ".h")


class ArtifactMismatch(RuntimeError):
    """An artifact directory built for something else than what is being run."""


def code_hash(packages: tuple[str, ...] = CODE_PACKAGES) -> str:
    """sha256 over the sources a captured graph is made of: any edit to them invalidates artifacts."""
    h = hashlib.sha256()
    for package in packages:
        root = Path(next(iter(importlib.import_module(package).__path__)))
        for path in sorted(p for p in root.rglob("*") if p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts):
            h.update(f"{package}/{path.relative_to(root).as_posix()}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def artifact_key(model, backend: str, shapes: ShapePlan, **extra) -> dict:
    """Everything a set of graphs depends on; `extra`: backend-specific entries (versions, options)."""
    key = {
        "model_config": model.config.to_json(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": model.device.type,
        "tp_size": model.parallel.tp_size,
        "rank": model.parallel.rank,
        "ops": model.ops_name,
        "weights": getattr(model, "weights", "dense"),
        "backend": backend,
        "shapes": shapes.to_record(),
        "graphs": [s.to_json() for s in shapes.specs()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "code_sha256": code_hash(),
    }
    key.update(extra)
    return key


def _differences(found: dict, wanted: dict) -> list[str]:
    out = []
    for k in sorted(set(found) | set(wanted)):
        if found.get(k) != wanted.get(k):
            if k == "graphs":
                out.append("graphs (static shapes)")
            elif k == "model_config":
                diff = [f for f in wanted[k] if found.get(k, {}).get(f) != wanted[k][f]]
                out.append(f"model_config ({', '.join(diff)})")
            elif k == "shapes":
                have = found.get(k) or {}
                diff = [f"{f}: artifacts have {have.get(f)!r}, this run needs {wanted[k][f]!r}"
                        for f in wanted[k] if have.get(f) != wanted[k][f]]
                out.append(f"shapes ({'; '.join(diff)})")
            else:
                out.append(f"{k}: artifacts have {found.get(k)!r}, this run needs {wanted.get(k)!r}")
    return out


@dataclass
class Manifest:
    key: dict
    files: dict[str, str]  # graph name -> file, relative to the rank directory
    compile_seconds: float = 0.0
    created: str = ""

    def to_json(self) -> dict:
        return {"key": self.key, "files": self.files, "compile_seconds": round(self.compile_seconds, 2),
                "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class ArtifactDir:
    """This rank's part of an artifact root. Nothing else builds these paths."""

    def __init__(self, root: str | Path, tp_size: int = 1, rank: int = 0):
        self.root = Path(root)
        self.tp_size, self.rank = tp_size, rank
        self.path = self.root / f"tp{tp_size}-rank{rank}"

    def __repr__(self) -> str:
        return f"ArtifactDir({str(self.path)!r})"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def inductor(self) -> Path:
        return self.path / "inductor"

    def inductor_graph(self, name: str) -> Path:
        return self.inductor / f"{name}.bin"

    def torchair_graph(self, name: str) -> Path:
        return self.path / "torchair" / name

    def build_hint(self, backend: str) -> str:
        launch = f"torchrun --nproc-per-node {self.tp_size} " if self.tp_size > 1 else "python "
        tp = f" --tp {self.tp_size}" if self.tp_size > 1 else ""
        return f"{launch}-m gptoss.tools.compile --model MODEL --backend {backend}{tp} --out {self.root}"

    # -- the manifest ----------------------------------------------------------------------------------------
    def read(self) -> Manifest | None:
        path = self.manifest_path
        if not path.is_file():
            return None
        try:
            body = json.loads(path.read_text())
            return Manifest(body["key"], body["files"], body.get("compile_seconds", 0.0), body.get("created", ""))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ArtifactMismatch(f"{path} is not a manifest this runtime wrote ({e}); rebuild with --force") from e

    def write(self, manifest: Manifest) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
        tmp.replace(self.manifest_path)  # written last and atomically: a manifest means a complete directory

    def shapes(self) -> ShapePlan | None:
        """The shape settings these artifacts were built for (None without a manifest)."""
        manifest = self.read()
        if manifest is None or "shapes" not in manifest.key:
            return None
        return ShapePlan.from_record(manifest.key["shapes"])

    # -- the one policy --------------------------------------------------------------------------------------
    def open(self, wanted: dict, *, rebuild: bool, compile_missing: bool) -> Manifest | None:
        """Returns the manifest when the directory was built for `wanted` (load it); otherwise leaves it empty
        and ready to be filled (compile), or refuses:
        - a manifest for something else: ArtifactMismatch naming what differs, unless `rebuild` (then wiped);
        - no manifest and `compile_missing` false: ArtifactMismatch saying how to build it;
        - no manifest but other files: refused unless `rebuild` (never write into, or load from, unknown files)."""
        manifest = self.read() if not rebuild else _read_or_none(self)
        if manifest is not None:
            diffs = _differences(manifest.key, wanted)
            missing = [f for f in manifest.files.values() if not (self.path / f).exists()]
            if not diffs and not missing:
                return manifest
            if not rebuild:
                if diffs:
                    raise ArtifactMismatch(f"artifacts in {self.path} were built for something else; differing: "
                                           + "; ".join(diffs) + " (rebuild with --force)")
                raise ArtifactMismatch(f"artifacts in {self.path} are incomplete: {missing[0]} is missing")
            shutil.rmtree(self.path)
        elif not compile_missing:
            raise ArtifactMismatch(f"no compiled graphs in {self.path} (no {MANIFEST}): build them first with "
                                   f"`{self.build_hint(wanted.get('backend', 'inductor'))}`")
        elif self.path.exists() and any(self.path.iterdir()):
            if not rebuild:
                raise ArtifactMismatch(f"{self.path} is not empty and has no {MANIFEST}: refusing to write "
                                       "artifacts into it")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return None


def _read_or_none(directory: ArtifactDir) -> Manifest | None:
    try:
        return directory.read()
    except ArtifactMismatch:  # rebuilding anyway
        shutil.rmtree(directory.path)
        return None
