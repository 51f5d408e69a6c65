"""Tensor parallelism across processes: one process per rank, launched by torchrun.

    torchrun --nproc-per-node 8 -m gptoss.tools.generate --model /models/gpt-oss-120b --tp 8 ...

`setup()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK; MASTER_ADDR/MASTER_PORT for the
rendezvous), picks the backend from the device type (gloo on CPU, nccl on CUDA, hccl on Ascend NPU), binds the
process to device LOCAL_RANK, and initialises the default process group with a finite timeout. Outside torchrun
(no WORLD_SIZE) it does nothing and tensor parallelism is 1.

Failure handling, so that a rank that dies or stalls makes the others exit with an error instead of hanging:
- every collective runs under the process group's timeout (default 300 s; `GPTOSS_DIST_TIMEOUT` or the
  `timeout_s` argument): a peer that stalls makes the next collective raise once it expires;
- a peer that dies closes its connections: gloo raises at once ("Connection closed by peer"); NCCL and HCCL are
  told to abort on a failed or timed-out collective (TORCH_NCCL_ASYNC_ERROR_HANDLING, HCCL_ASYNC_ERROR_HANDLING,
  HCCL_EXEC_TIMEOUT are set unless already set), so their watchdog ends the process after the timeout;
- an exception that escapes on a rank ends that process at once (`os._exit(1)` after printing the traceback tagged
  with the rank), rather than running interpreter teardown that might itself wait on the broken group; its peers
  then fail as above. torchrun also stops the remaining ranks when one exits with an error.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
COLLECTIVES = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}  # collective library per device type


class DistributedSetupError(RuntimeError):
    """A tensor-parallel size that does not match how the processes were launched."""


@dataclass(frozen=True)
class DistContext:
    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them; (1, 0, 0) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return world, rank, local


def is_main_process() -> bool:
    """True on rank 0 (and outside torchrun): the process that prints and writes outputs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_world()[1] == 0


def backend_for(device: torch.device) -> str:
    if device.type not in COLLECTIVES:
        raise DistributedSetupError(f"no collective backend for device type '{device.type}'; "
                                    f"supported: {sorted(COLLECTIVES)}")
    return COLLECTIVES[device.type]


def default_timeout_s() -> float:
    return float(os.environ.get("GPTOSS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def setup(tp_size: int | None = None, device: str | torch.device | None = None,
          timeout_s: float | None = None, fail_fast: bool = True) -> DistContext:
    """Join (or create) the default process group for `tp_size` ranks; `tp_size` defaults to WORLD_SIZE.

    Tensor parallelism uses every launched process: `tp_size` must equal WORLD_SIZE. A CUDA or NPU device
    without an index becomes device LOCAL_RANK."""
    world, rank, local = env_world()
    tp = world if tp_size is None else int(tp_size)
    timeout_s = default_timeout_s() if timeout_s is None else float(timeout_s)
    if timeout_s <= 0:
        raise ValueError(f"the collective timeout must be positive, got {timeout_s}")
    if tp < 1:
        raise DistributedSetupError(f"tp_size must be >= 1, got {tp}")
    if tp != world:
        if world == 1:
            raise DistributedSetupError(
                f"tp_size={tp} needs one process per rank: launch with `torchrun --nproc-per-node {tp} ...`")
        raise DistributedSetupError(
            f"tp_size={tp} but torchrun started WORLD_SIZE={world} processes: tensor parallelism uses every "
            f"process, so pass --tp {world} or launch with --nproc-per-node {tp}")

    device = torch.device(device or "cpu")
    if device.type == "npu":
        import torch_npu  # noqa: F401  (registers the npu device and the hccl backend)
    if world > 1 and device.type in ("cuda", "npu") and device.index is None:
        device = torch.device(device.type, local)
    if device.type in ("cuda", "npu") and device.index is not None:
        getattr(torch, device.type).set_device(device.index)
    if world == 1:
        return DistContext(1, 0, 0, device, None, timeout_s)

    backend = backend_for(device)
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise DistributedSetupError(
                f"a process group of {dist.get_world_size()} (rank {dist.get_rank()}) is already initialised, "
                f"but the environment says rank {rank} of {world}")
        return DistContext(world, rank, local, device, dist.get_backend(), timeout_s)

    _backend_env(backend, timeout_s)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if fail_fast:
        install_fail_fast(rank, world, timeout_s)
    atexit.register(_shutdown)
    return DistContext(world, rank, local, device, backend, timeout_s)


def _backend_env(backend: str, timeout_s: float) -> None:
    """Make NCCL/HCCL failures surface as process exits instead of hangs (only where the user has not chosen)."""
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # abort the communicator, end the process
    elif backend == "hccl":
        os.environ.setdefault("HCCL_ASYNC_ERROR_HANDLING", "1")
        os.environ.setdefault("HCCL_EXEC_TIMEOUT", str(max(int(timeout_s), 1)))  # device-side wait, seconds
        os.environ.setdefault("HCCL_CONNECT_TIMEOUT", str(max(int(timeout_s), 120)))


_EXIT_BARRIER_S = 30.0  # how long a normal exit waits for the other ranks to reach theirs
_EXIT_DRAIN_S = 0.1  # GIL-free time given to gloo's worker threads before the interpreter is torn down


def _shutdown() -> None:
    """At interpreter exit, while it is still whole: settle gloo's worker threads, then destroy the group.

    Why the settling: a gloo worker thread drops its finished work (and the tensors in it) after `wait()` has
    already returned here, and dropping a tensor that Python also knows needs the GIL. A worker the OS scheduled
    late asks for the GIL once finalisation has begun; CPython then ends that thread with pthread_exit, which
    unwinds through a noexcept C++ frame: std::terminate, SIGABRT, and a failed exit after a good run (seen under
    CI load, 1 run in ~12 at tp 4 on 2 cores). destroy_process_group does not help by itself: compiled graphs keep
    references to the group, so its threads live on into finalisation. A barrier (bounded, so a dead peer cannot
    hold the exit) lets every rank's last collective complete, and a short sleep releases the GIL so a worker
    waiting for it drops its work while Python can still take the decref."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=_EXIT_BARRIER_S), wait_all_ranks=True)
            time.sleep(_EXIT_DRAIN_S)
    except Exception:  # a peer already gone: nothing to wait for
        pass
    try:
        dist.destroy_process_group()
    except Exception:  # a broken group at exit: nothing left to do
        pass


_COLLECTIVE_WORDS = ("gloo", "nccl", "hccl", "connection", "timed out", "timeout", "peer", "collective",
                     "process group", "processgroup", "c10d")


def install_fail_fast(rank: int, world: int, timeout_s: float) -> None:
    """An uncaught exception on this rank prints its traceback tagged `[rank r/N]` and ends the process at once."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, SystemExit):
            return previous(exc_type, exc, tb)
        try:
            sys.stdout.flush()
            lines = traceback.format_exception(exc_type, exc, tb)
            tag = f"[rank {rank}/{world}] "
            sys.stderr.write("".join(tag + line for chunk in lines for line in chunk.splitlines(True)))
            text = f"{exc_type.__name__} {exc}".lower()
            if any(w in text for w in _COLLECTIVE_WORDS):
                sys.stderr.write(f"{tag}a collective failed: a peer rank exited or stalled (collective timeout "
                                 f"{timeout_s:g} s); exiting\n")
            else:
                sys.stderr.write(f"{tag}exiting; the other ranks will fail at their next collective\n")
            sys.stderr.flush()
        finally:
            os._exit(130 if issubclass(exc_type, KeyboardInterrupt) else 1)

    sys.excepthook = hook


__all__ = ["DEFAULT_TIMEOUT_S", "DistContext", "DistributedSetupError", "backend_for", "env_world",
           "install_fail_fast", "is_main_process", "setup"]
