"""What identifies a set of compiled graphs, and the manifest that records it next to them.

A graph is only valid for the exact model code, config, dtype, static shapes, tensor-parallel rank, backend and
library versions it was built from; torch's own serialised graphs skip their guards on load, so the manifest is
the guard: a directory whose key differs is refused (with the fields that differ) or rebuilt, never run.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MANIFEST = "manifest.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("model", "graph")


class ArtifactMismatch(RuntimeError):
    """An artifact directory built for something else than what is being run."""


def code_hash() -> str:
    """sha256 over the project's model and graph sources: any edit to what is captured invalidates artifacts."""
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for path in sorted((PROJECT_ROOT / d).rglob("*.py")):
            h.update(str(path.relative_to(PROJECT_ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def artifact_key(model, backend: str, graphs: list[dict], dtype: torch.dtype, device: torch.device) -> dict:
    return {
        "model_config": model.config.to_json(),
        "dtype": str(dtype).removeprefix("torch."),
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
        "code_sha256": code_hash(),
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
