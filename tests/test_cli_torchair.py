"""The README's Ascend commands, end to end against the test emulator: compile with `--backend torchair`, then
generate from the artifacts with the shape settings read back from each rank's manifest; at TP 1 and under
torchrun at TP 2 (gloo). The default suite runs a small shape set; the README's own settings (dozens of graphs)
are slow-marked."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss.tools.make_checkpoint import make_checkpoint

HERE = Path(__file__).resolve().parent
SMALL = ["--max-seq-len", "128", "--prefill-chunk", "32", "--batch-sizes", "1", "--max-batch-size", "1"]
README = ["--max-seq-len", "4096", "--batch-sizes", "1,8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("air_cli") / "ckpt", {"num_hidden_layers": 2}, layout="mxfp4")


def _run(tp: int, module: str, *args, timeout: int = 900) -> str:
    launch = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc-per-node={tp}"]
    tp_args = ["--tp", str(tp)] if tp > 1 else []
    cmd = launch + [str(HERE / "npu_cli.py"), module, *args, *tp_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _compile_then_generate(checkpoint, out: Path, tp: int, shapes: list[str]) -> None:
    common = ["--model", str(checkpoint), "--backend", "torchair", "--device", "npu"]
    said = _run(tp, "gptoss.tools.compile", *common, *shapes, "--out", str(out))
    assert "torchair graphs" in said
    for r in range(tp):
        key = json.loads((out / f"tp{tp}-rank{r}" / "manifest.json").read_text())["key"]
        assert key["backend"] == "torchair" and key["tp_size"] == tp and key["rank"] == r
        assert key["shapes"]["max_seq_len"] == int(shapes[shapes.index("--max-seq-len") + 1])
    # no shape flags: they come from the manifest, and nothing compiles (compile_missing is off)
    said = _run(tp, "gptoss.tools.generate", *common, "--artifacts", str(out), "--prompt", "Hello",
                "--max-new-tokens", "4")
    assert "ready in" in said and "artifacts" in said and "4 tokens" in said


@pytest.mark.parametrize("tp", [1, 2])
def test_readme_torchair_commands_small(checkpoint, tmp_path, tp):
    _compile_then_generate(checkpoint, tmp_path / "art", tp, SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_readme_torchair_commands_at_readme_settings(checkpoint, tmp_path, tp):
    _compile_then_generate(checkpoint, tmp_path / "art", tp, README)
