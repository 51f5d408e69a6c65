"""What identifies a set of compiled graphs, and the manifest that records it next to them.

A graph is only valid for the exact model code, config, dtype, static shapes, tensor-parallel rank, backend and
library versions it was built from; torch's own serialised graphs skip their guards on load, so the manifest is
the guard: a directory whose key differs is refused (with the fields that differ) or rebuilt, never run.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MANIFEST = "manifest.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What a captured graph is made of: the model, the reference op table (other tables build on its helpers), and
# how graph/ captures it. The active op table is added per key. Tools, tests and the runtime are not.
CODE_FILES = ("model/*.py", "model/kernels/__init__.py", "model/kernels/csrc/*", "model/ops/__init__.py", "model/ops/grouped_mm.py", "model/ops/torch_ops.py",
              "graph/entry.py", "graph/compiler.py", "graph/artifacts.py")


class ArtifactMismatch(RuntimeError):
    """An artifact directory built for something else than what is being run."""


def code_hash(ops: str = "torch", extra: tuple[str, ...] = ()) -> str:
    """sha256 over the sources a captured graph is made of: any edit to them invalidates artifacts."""
    patterns = CODE_FILES + (f"model/ops/{ops}_ops.py",) + extra
    paths = sorted({p for pattern in patterns for p in PROJECT_ROOT.glob(pattern)})
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.relative_to(PROJECT_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def artifact_key(model, backend: str, graphs: list[dict], dtype: torch.dtype, device: torch.device,
                 code_files: tuple[str, ...] = ()) -> dict:
    """Everything a set of graphs depends on. `code_files`: backend-specific sources (glob patterns) to hash too."""
    return {
        "model_config": model.config.to_json(),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": getattr(model, "weights", "dense"),  # how weights are held: another format is another graph
        "device": device.type,
        "tp_size": model.parallel.tp_size,
        "rank": model.parallel.rank,
        "ops": model.ops_name,
        "backend": backend,
        "graphs": graphs,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),  # inductor's CPU kernels bake the OpenMP thread count in
        "code_sha256": code_hash(model.ops_name, code_files),
    }


def _differences(found: dict, wanted: dict) -> list[str]:
    out = []
    for k in sorted(set(found) | set(wanted)):
        if found.get(k) != wanted.get(k):
            if k == "graphs":
                out.append("graphs (static shapes)")
            elif k == "model_config":
                diff = [f for f in wanted[k] if found.get(k, {}).get(f) != wanted[k][f]]
                out.append(f"model_config ({', '.join(diff)})")
            else:
                out.append(f"{k}: artifacts have {found.get(k)!r}, this run needs {wanted.get(k)!r}")
    return out


@dataclass
class Manifest:
    key: dict
    files: dict[str, str]  # graph name -> file name
    compile_seconds: float = 0.0
    created: str = ""

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        body = {"key": self.key, "files": self.files, "compile_seconds": round(self.compile_seconds, 2),
                "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (directory / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "Manifest | None":
        path = directory / MANIFEST
        if not path.is_file():
            return None
        body = json.loads(path.read_text())
        return cls(body["key"], body["files"], body.get("compile_seconds", 0.0), body.get("created", ""))

    def check(self, wanted: dict, directory: Path) -> None:
        diffs = _differences(self.key, wanted)
        if diffs:
            raise ArtifactMismatch(f"artifacts in {directory} were built for something else; differing: "
                                   + "; ".join(diffs))
        missing = [f for f in self.files.values() if not (directory / f).is_file()]
        if missing:
            raise ArtifactMismatch(f"artifacts in {directory} are incomplete: {missing[0]} is missing")


def open_artifact_dir(directory: Path, wanted: dict, *, rebuild: bool, compile_missing: bool,
                      build_hint: str = "") -> Manifest | None:
    """The one policy for an artifact directory. Returns its manifest when it was built for `wanted` (load it);
    otherwise leaves the directory empty and ready to be filled (compile), or refuses:
    - a manifest for something else: ArtifactMismatch naming what differs, unless `rebuild` (then wiped);
    - no manifest and `compile_missing` false: ArtifactMismatch saying how to build it;
    - no manifest but other files: refused unless `rebuild` (never write into, or load from, unknown files)."""
    manifest = Manifest.read(directory)
    if manifest is not None:
        try:
            manifest.check(wanted, directory)
            return manifest
        except ArtifactMismatch:
            if not rebuild:
                raise
        shutil.rmtree(directory)
    elif not compile_missing:
        raise ArtifactMismatch(f"no compiled graphs in {directory} (no manifest.json): build them first"
                               + (f" with `{build_hint}`" if build_hint else ""))
    elif directory.exists() and any(directory.iterdir()):
        if not rebuild:
            raise ArtifactMismatch(f"{directory} is not empty and has no manifest.json: refusing to write "
                                   "artifacts into it")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return None
