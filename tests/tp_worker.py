"""One rank of the tensor-parallel checks in tests/test_tp.py: launched by torchrun (or with torchrun's environment
set by hand), or called in-process for the tp 1 reference.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py parity OUT eager CKPT...
        (TP_WORKER_ARTIFACTS=DIR: graphs compiled into / loaded from DIR/<checkpoint>; TP_WORKER_LOAD=1: load only)
        (TP_WORKER_WEIGHTS=dense|published: how the weights are held; the loader's default otherwise)
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py memory OUT CKPT
    RANK=.. WORLD_SIZE=2 MASTER_ADDR=.. MASTER_PORT=.. python tests/tp_worker.py die OUT kill|stop TIMEOUT CKPT

Each rank writes its results to OUT/<name>_rank<r>.pt (or .json).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gptoss.runtime import Runtime  # noqa: E402

PROMPT, DECODE, SLOTS, CHUNK = 32, 30, 64, 16
LENGTHS = (PROMPT, PROMPT - 5)  # two rows of different lengths


def _runtime(ckpt, backend: str, **kw) -> Runtime:
    if os.environ.get("TP_WORKER_DTYPE"):
        kw["dtype"] = os.environ["TP_WORKER_DTYPE"]
    if os.environ.get("TP_WORKER_WEIGHTS"):
        kw.setdefault("weights", os.environ["TP_WORKER_WEIGHTS"])
    if backend == "inductor":
        kw.setdefault("compiled", "all")  # prompt graphs too (CPU's default compiles decode steps only)
    return Runtime.from_pretrained(ckpt, backend=backend, max_batch_size=2, max_seq_len=SLOTS,
                                   prefill_chunk=CHUNK, batch_sizes=[2], progress=False, **kw)


def parity(ckpt, backend: str, **kw) -> dict:
    """Teacher-forced logits (two-chunk prefill, then DECODE steps) through the runtime's graphs, greedy tokens,
    and tokens sampled with a different RNG seed on every rank (equal only if rank 0's are broadcast). `kw`:
    more runtime settings (the TP 1 reference runs window_cache="full")."""
    artifacts = os.environ.get("TP_WORKER_ARTIFACTS")  # compile into / load from <dir>/<checkpoint name>
    if artifacts:
        kw.update(artifacts=Path(artifacts) / Path(ckpt).name, compile_missing=not os.environ.get("TP_WORKER_LOAD"))
    rt = _runtime(ckpt, backend, **kw)
    vocab = rt.config.vocab_size
    ids = torch.randint(0, vocab, (2, SLOTS), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        for start in range(0, PROMPT, CHUNK):
            last = (lengths - 1 - start).clamp(0, CHUNK - 1)
            logits = rt._prefill(ids[:, start:start + CHUNK].contiguous(), torch.full((2,), start), last,
                                 rt.shapes.kv_len(start + CHUNK))
        prefill = logits.float().clone()
        pos, decode = lengths.clone(), []
        for _ in range(DECODE):
            out = rt._decode(ids[torch.arange(2), pos].contiguous(), pos.clone(), rt.shapes.kv_len(int(pos.max()) + 1))
            decode.append(out.float().clone())
            pos = pos + 1
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (20, 9)]
    greedy = [r.token_ids for r in rt.generate(prompts, max_new_tokens=DECODE)]
    torch.manual_seed(1000 + rt.model.parallel.rank)  # unseeded sampling differs per rank unless synchronised
    sampled = [r.token_ids for r in rt.generate(prompts, max_new_tokens=16, temperature=1.0)]
    return {"prefill": prefill, "decode": torch.stack(decode), "greedy": greedy, "sampled": sampled,
            "tp": rt.model.parallel.tp_size, "plan": rt.model.plan.__dict__, "backend": rt.backend,
            "graphs": len(rt.graphs.fns), "loaded_from": str(rt.graphs.loaded_from or ""),
            "weights": rt.model.weights, "cache_slots": sorted({k.shape[1] for k in rt.cache.keys})}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory(ckpt) -> dict:
    """Peak RSS of this rank: baseline after imports and process-group setup, peak while loading, peak after
    a short generation."""
    from gptoss.runtime.distributed import setup
    setup()  # the process group first, so its own memory is part of the baseline
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    baseline = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    rt = _runtime(ckpt, "eager")
    load_s = time.perf_counter() - t0
    load_peak = _status_bytes("VmHWM")
    rt.generate([[5, 6, 7, 8]], max_new_tokens=8)
    params = sum(p.numel() * p.element_size() for p in rt.model.parameters())
    return {"baseline_rss": baseline, "load_peak_rss": load_peak, "peak_rss": _status_bytes("VmHWM"),
            "param_bytes": params, "kv_cache_bytes": rt.cache.nbytes, "load_s": load_s,
            "tp": rt.model.parallel.tp_size, "rank": rt.model.parallel.rank}


def die(ckpt, how: str, timeout_s: float, out: Path) -> None:
    """Rank 1 dies (SIGKILL) or stalls (SIGSTOP) during decode; rank 0 keeps generating and must fail."""
    rt = _runtime(ckpt, "eager", dist_timeout_s=timeout_s)
    rank = rt.model.parallel.rank
    for i, _ in enumerate(rt.generate([[1, 2, 3, 4, 5]], max_new_tokens=40, stream=True)):
        if rank == 1 and i == 5:
            (out / "died_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    print(f"rank {rank}: generation finished", flush=True)  # not reached on rank 0 when the check passes


def main(argv: list[str]) -> int:
    task, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    if task == "parity":
        backend, ckpts = argv[2], argv[3:]
        for ckpt in ckpts:
            torch.save(parity(ckpt, backend), out / f"{Path(ckpt).name}_{backend}_rank{rank}.pt")
    elif task == "memory":
        (out / f"memory_rank{rank}.json").write_text(json.dumps(memory(argv[2])))
    elif task == "die":
        die(argv[4], argv[2], float(argv[3]), out)
    else:
        raise SystemExit(f"unknown task {task}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
