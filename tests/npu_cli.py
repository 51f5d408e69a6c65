"""Run a gptoss command as on an Ascend machine, with the test emulator standing in for torch_npu, torchair and
the device (tests only):

    python tests/npu_cli.py gptoss.tools.compile --model DIR --backend torchair --device npu ...
    torchrun --nproc-per-node 2 tests/npu_cli.py gptoss.tools.generate --tp 2 ...

The emulated ops compute on CPU tensors: `--device npu` becomes cpu (and the torchair backend is allowed there),
and the dtype stays the NPU default (bfloat16) unless the command names one.
"""
import dataclasses
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from npu_emulator import installed  # noqa: E402

from gptoss.graph import backends  # noqa: E402
from gptoss.tools.cli import run_cli  # noqa: E402


def main() -> None:
    module, argv = sys.argv[1], sys.argv[2:]
    torchair = backends.BACKENDS["torchair"]
    backends.BACKENDS["torchair"] = dataclasses.replace(torchair, devices=torchair.devices + ("cpu",))
    argv = ["cpu" if a == "npu" else a for a in argv]
    if "--dtype" not in argv:
        argv += ["--dtype", "bfloat16"]
    with installed():
        run_cli(lambda: importlib.import_module(module).main(argv))


if __name__ == "__main__":
    main()
