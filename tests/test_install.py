"""A regular (non-editable) install: a wheel of the project installed into a fresh virtualenv. The runtime
imports from it, the commands run, only `gptoss` lands in site-packages (no bare `tools`, `model`, ...; the
developer tools stay in the checkout), and the artifact key (code hash included) equals the editable install's."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY_SCRIPT = """
import json, sys, torch
from gptoss.graph.artifacts import artifact_key, code_hash
from gptoss.graph import ShapePlan
from gptoss.model.loader import load_model
model = load_model(sys.argv[1])
key = artifact_key(model, "inductor", ShapePlan(1, 128, 16), threads=1)
print(json.dumps(key, sort_keys=True))
"""


@pytest.mark.slow
def test_regular_install(tmp_path):
    wheels = tmp_path / "wheels"
    # build with this environment's setuptools (no download), as `pip install .` would
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the project's dependencies (torch, transformers, ...) from this environment, not a second download
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    top = sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")))
    assert top == ["gptoss"], top
    assert not (site / "gptoss" / "tools" / "dev").exists()

    outside = tmp_path / "elsewhere"  # not the checkout: nothing can come from the repository's folders
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *args: subprocess.run([str(py), *args], cwd=outside, env=env, capture_output=True, text=True,  # noqa
                                       timeout=600)
    proc = run("-m", "gptoss.tools.make_checkpoint", "--preset", "tiny", "--out", str(outside / "tiny"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run("-m", "gptoss.tools.generate", "--model", str(outside / "tiny"), "--backend", "eager",
               "--max-new-tokens", "3", "--prompt", "Hello")
    assert proc.returncode == 0 and "3 tokens" in proc.stderr, proc.stderr[-2000:]
    proc = run("-c", "import gptoss.runtime, gptoss.model; print(gptoss.runtime.__file__)")
    assert str(site) in proc.stdout, proc.stdout + proc.stderr

    installed = run("-c", KEY_SCRIPT, str(outside / "tiny"))
    assert installed.returncode == 0, installed.stderr[-2000:]
    editable = subprocess.run([sys.executable, "-c", KEY_SCRIPT, str(outside / "tiny")], capture_output=True,
                              text=True, cwd=outside)
    assert editable.returncode == 0, editable.stderr[-2000:]
    assert json.loads(installed.stdout) == json.loads(editable.stdout)
