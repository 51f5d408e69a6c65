"""Loading streams tensor by tensor: peak RSS stays within 1.3x the loaded model (bench-size checkpoint)."""
import json
import os
import subprocess
import sys

import pytest

from gptoss.tools.make_checkpoint import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["mxfp4", "fp32"])
def test_bench_checkpoint_loads_within_1_3x(tmp_path, layout):
    ckpt = make_checkpoint(tmp_path / "bench", "bench", layout=layout)
    proc = subprocess.run([sys.executable, "-m", "gptoss.tools.dev.load_memory", "--model", str(ckpt)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["model_bytes"] > 900e6
    assert report["ratio"] <= 1.3, report
