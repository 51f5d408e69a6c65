"""A bounded load test of the server on 127.0.0.1, in three processes as it would run: the engine (the scheduler,
stepping in a thread of this process), the HTTP front end (a process of its own, as `tools.serve` starts it;
`--frontend thread` serves from a thread of this process instead), and the clients (asyncio, in a process of their
own, so they never share a GIL with the engine):

1. `--requests` requests (prompt lengths 1..`--max-prompt`, max_tokens 1..`--max-tokens`, greedy, token-id
   prompts) from `--clients` concurrent streaming clients: every request must complete with the text that
   `Runtime.generate` gives for it alone; p50/p99 time to first token and inter-token latency; throughput;
2. the same requests through `Runtime.generate` in static batches of max-batch-size (each batch runs until its
   longest request ends): throughput ratio;
3. the same requests one at a time through the server (`--serial N`: the first N only): throughput ratio;
4. the longest stall of four running streams while a `--long-prompt`-token prompt is admitted (vs their median
   inter-token gap);
5. memory over `--memory-requests` more short requests: resident size, and the Python heap, live tensors and
   the scheduler's bookkeeping (which would grow with a leak, where resident size also moves with the allocator);
6. the same requests through the scheduler alone (no HTTP, stepped in this thread, as many outstanding as there
   are clients): what the server's HTTP and streaming cost on the same cores.

    python -m gptoss.tools.dev.load_test [--model DIR] [--clients 32] [--requests 64] [--max-batch-size 8]
                                         [--backend inductor --artifacts DIR] [--frontend process|thread]

Without --model it builds the tiny checkpoint in a temporary directory. Prints one JSON object of figures.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc

import httpx
import torch

from gptoss.runtime import Runtime
from gptoss.runtime.scheduler import Request, Scheduler
from gptoss.runtime.server import create_app
from gptoss.runtime.server.background import LiveServer, SplitServer, step_while
from gptoss.runtime.server.heap import freeze_startup_objects
from gptoss.runtime.server.local_engine import LocalEngine


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def stream_one(client, url, model, prompt, max_tokens, ignore_eos=False, started=None, until=None):
    """(text, completion tokens, ttft, [inter-token gaps], arrival times of chunks). `started` (an asyncio.Event)
    is set at the first chunk; once `until` (an asyncio.Event) is set the client stops reading and disconnects."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    t0 = time.perf_counter()
    text, times, usage = [], [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"]:
                times.append(time.perf_counter())
                text.append(chunk["choices"][0]["text"])
                if started is not None:
                    started.set()
                if until is not None and until.is_set():
                    break
    gaps = [b - a for a, b in zip(times, times[1:])]
    return "".join(text), usage["completion_tokens"] if usage else len(times), times[0] - t0, gaps, times


async def run_clients(url, model, requests, clients):
    queue = list(enumerate(requests))
    results = {}
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker():
            while queue:
                i, (prompt, n) = queue.pop(0)
                results[i] = await stream_one(client, url, model, prompt, n)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - t0


async def stall_probe(url, model, short_prompts, long_prompt):
    """One running stream per short prompt; once each has its first token, the long prompt arrives; the streams
    stop when it has been admitted (its first token). The gaps of the streams while it is admitted (longest, median) against
    their median gap before it arrived."""
    async with httpx.AsyncClient(timeout=600) as client:
        started = [asyncio.Event() for _ in short_prompts]
        admitted = asyncio.Event()
        tasks = [asyncio.create_task(stream_one(client, url, model, p, len(long_prompt), ignore_eos=True, started=e,
                                                until=admitted))
                 for p, e in zip(short_prompts, started)]
        for e in started:
            await e.wait()
        await asyncio.sleep(0.5)  # a few steady gaps first
        t_long = time.perf_counter()
        _, _, ttft_long, _, _ = await stream_one(client, url, model, long_prompt, 1)
        t_admitted = t_long + ttft_long
        admitted.set()
        outs = await asyncio.gather(*tasks)
    window, steady = [], []
    for _, _, _, _, times in outs:
        for a, b in zip(times, times[1:]):
            if b < t_long:
                steady.append(b - a)
            elif a <= t_admitted:
                window.append(b - a)
    return {"long_prompt_tokens": len(long_prompt), "long_prompt_ttft_s": round(ttft_long, 4),
            "max_stall_s": round(max(window), 4) if window else None,
            "gap_p50_while_admitting_s": round(statistics.median(window), 4) if window else None,
            "median_gap_before_s": round(statistics.median(steady), 4) if steady else None}


def memory_probe(vocab, rng, scheduler, args, clients, frontend_pid, core=None) -> dict:
    """Resident memory of the engine's and the front end's processes over `--memory-requests` short requests
    (after a warm-up of a tenth as many; `clients(requests)` sends them), in four rounds; and what would show a
    leak apart from allocator noise: the growth of the engine's Python heap (tracemalloc), of live tensors and of
    the scheduler's and the engine link's (`core`) bookkeeping."""
    def requests(n):
        return [([rng.randrange(vocab) for _ in range(rng.randint(1, 64))], rng.randint(1, 8)) for _ in range(n)]

    def live_tensors() -> int:
        gc.collect()
        return sum(type(o) in (torch.Tensor, torch.nn.Parameter) for o in gc.get_objects())

    clients(requests(max(args.memory_requests // 10, 1)))
    gc.collect()
    tensors, rss, frontend_rss = live_tensors(), [rss_mb()], [rss_mb(frontend_pid)]
    tracemalloc.start()
    heap0 = tracemalloc.get_traced_memory()[0]
    per_round = args.memory_requests // 4
    for _ in range(4):
        clients(requests(per_round))
        gc.collect()
        rss.append(rss_mb())
        frontend_rss.append(rss_mb(frontend_pid))
    heap = tracemalloc.get_traced_memory()[0] - heap0
    tracemalloc.stop()
    return {"requests": 4 * per_round, "rss_mb_per_round": [round(r, 1) for r in rss],
            "rss_growth_mb": round(rss[-1] - rss[0], 1),
            "frontend_rss_mb_per_round": [round(r, 1) for r in frontend_rss],
            "frontend_rss_growth_mb": round(frontend_rss[-1] - frontend_rss[0], 1),
            "python_heap_growth_kb": round(heap / 1024, 1), "live_tensor_growth": live_tensors() - tensors,
            "scheduler_open_handles": len(scheduler._handles), "scheduler_waiting": len(scheduler._waiting),
            "engine_link_open_handles": None if core is None else len(core._handles) + len(core._ended)}


def scheduler_alone(rt, requests, outstanding, served_wall, reuse_prefixes: bool = True) -> dict:
    """The requests through a fresh Scheduler stepped in this thread, at most `outstanding` submitted and not yet
    finished at a time (as the clients keep them): wall time and tokens/s without HTTP."""
    scheduler, pending, handles = Scheduler(rt, reuse_prefixes=reuse_prefixes), list(requests), []
    t0, cpu0 = time.perf_counter(), cpu_s()
    while pending or scheduler.busy:
        while pending and sum(not h.done.is_set() for h in handles) < outstanding:
            prompt, n = pending.pop(0)
            handles.append(scheduler.submit(Request(tuple(prompt), n)))
        scheduler.step()
    wall, cpu = time.perf_counter() - t0, cpu_s() - cpu0
    tokens = scheduler.metrics.tokens_generated
    return {"wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2), "cpu_s": round(cpu, 2),
            "served_wall_over_this": round(served_wall / wall, 2)}


def cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds a process has used (all its threads)."""
    with open(f"/proc/{pid or os.getpid()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=2304)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--interleave-chunk", type=int, default=None,
                    help="prompt tokens prefilled per step while others decode (default: the server's, 256)")
    ap.add_argument("--mixed-steps", action=argparse.BooleanOptionalAction, default=False,
                    help="a prompt's chunk and the decode step as one graph (tools.serve's --mixed-steps)")
    ap.add_argument("--prefill-granule", type=int, default=None,
                    help="first/last chunks round up to a multiple of this (0: powers of two; default: the backend's)")
    ap.add_argument("--serial", type=int, default=None,
                    help="requests sent one at a time for the ratio (default: all of them, the same work as served)")
    ap.add_argument("--long-prompt", type=int, default=2000)
    ap.add_argument("--memory-requests", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="eager", help="eager | inductor (graphs compiled first, or loaded from "
                                                        "--artifacts)")
    ap.add_argument("--artifacts", default=None)
    ap.add_argument("--compiled", default=None, choices=["all", "decode"],
                    help="inductor: every entry point compiled or decode steps only (the default on CPU)")
    ap.add_argument("--frontend", choices=("process", "thread"), default="process",
                    help="HTTP in a process of its own (as tools.serve runs it) or in a thread beside the engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefix-reuse", action=argparse.BooleanOptionalAction, default=True,
                    help="a free row's K/V serve a later prompt with the same beginning (tools.serve's default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model_dir = args.model
    if model_dir is None:
        from gptoss.tools.make_checkpoint import make_checkpoint
        model_dir = make_checkpoint(os.path.join(tempfile.mkdtemp(), "tiny"), "tiny")
    if args.backend != "eager" and args.artifacts is None:  # the reference runtime below loads the same graphs
        args.artifacts = tempfile.mkdtemp(prefix="load-test-artifacts-")
    settings = dict(max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                    prefill_chunk=args.prefill_chunk, interleave_chunk=args.interleave_chunk,
                    mixed_steps=args.mixed_steps, prefill_granule=args.prefill_granule, progress=False,
                    backend=args.backend, artifacts=args.artifacts, compiled=args.compiled)
    rt = Runtime.from_pretrained(model_dir, **settings)
    ref = Runtime(rt.model, model_dir, **settings)  # its own cache: the reference runs one request at a time
    rng = random.Random(args.seed)
    vocab = rt.config.vocab_size
    requests = [([rng.randrange(vocab) for _ in range(rng.randint(1, args.max_prompt))],
                  rng.randint(1, args.max_tokens)) for _ in range(args.requests)]
    figures = {"backend": args.backend, "clients": args.clients, "requests": args.requests,
               "max_batch_size": args.max_batch_size,
               "prefill_chunk": args.prefill_chunk, "interleave_chunk": rt.shapes.interleave_chunk,
               "mixed_steps": args.mixed_steps, "prefill_granule": rt.shapes.granule,
               "torch_threads": args.threads, "model": str(model_dir), "frontend": args.frontend,
               "compiled": rt.settings.compiled, "prefix_reuse": args.prefix_reuse}

    scheduler = Scheduler(rt, reuse_prefixes=args.prefix_reuse)
    freeze_startup_objects()  # as tools.serve does, once the model is loaded
    split = args.frontend == "process"
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as clients:
        def phases(server) -> tuple[dict, float]:  # in a helper thread: the engine steps in this one
            frontend_pid = server.frontend.process.pid if split else os.getpid()
            url = server.url
            clients.submit(served_phase, url, requests[:1], 1).result()  # the client process's imports, not timed
            clients.submit(freeze_startup_objects).result()  # a full collection there would look like a server stall
            pids = {"engine": os.getpid(), "frontend": frontend_pid, "clients": clients.submit(os.getpid).result()}
            cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
            results, wall = clients.submit(served_phase, url, requests, args.clients).result()
            cpu = {name: round(cpu_s(pid) - cpu0[name], 2) for name, pid in pids.items()}
            tokens = sum(r[1] for r in results.values())
            ttfts = [r[2] for r in results.values()]
            gaps = [g for r in results.values() for g in r[3]]
            figures["served"] = {"completed": len(results), "tokens": tokens, "wall_s": round(wall, 3),
                                 "tokens_per_s": round(tokens / wall, 2),
                                 "ttft_p50_s": round(pct(ttfts, 0.5), 4), "ttft_p99_s": round(pct(ttfts, 0.99), 4),
                                 "itl_p50_s": round(pct(gaps, 0.5), 4), "itl_p99_s": round(pct(gaps, 0.99), 4),
                                 # CPU seconds each process used during the phase (the front end is this process
                                 # with --frontend thread); the engine's include its torch threads
                                 "cpu_s": cpu if split else {k: v for k, v in cpu.items() if k != "frontend"}}

            # one at a time through the server
            serial = requests[:args.serial] if args.serial else requests
            serial_tokens, serial_wall = clients.submit(serial_phase, url, serial).result()
            serial_rate = serial_tokens / serial_wall
            figures["one_at_a_time"] = {"requests": len(serial), "tokens_per_s": round(serial_rate, 2),
                                        "served_speedup": round(tokens / wall / serial_rate, 2)}

            short = [[rng.randrange(vocab) for _ in range(8)] for _ in range(4)]
            long_prompt = [rng.randrange(vocab) for _ in range(args.long_prompt)]
            figures["stall"] = clients.submit(stall_phase, url, short, long_prompt).result()

            figures["memory"] = memory_probe(
                vocab, rng, scheduler, args, lambda reqs: clients.submit(served_phase, url, reqs, args.clients).result(),
                frontend_pid, getattr(server, "core", None))
            return results, wall

        # The engine steps in this thread, which loaded the model, as in tools.serve (SplitServer explains why)
        if split:
            server = SplitServer(scheduler, model_dir, "m")
            results, wall = server.serve_while(lambda: phases(server))
        else:
            with LiveServer(create_app(LocalEngine(scheduler), "m")) as server:
                results, wall = step_while(scheduler.run, lambda: phases(server),
                                           stop=lambda: scheduler.stop(timeout=0))
        tokens = figures["served"]["tokens"]
    figures["scheduler_alone"] = scheduler_alone(rt, requests, args.clients, wall, args.prefix_reuse)

    # correctness and the static-batch baseline, after the server is idle (no competition for the cores)
    mismatched = [i for i, (p, n) in enumerate(requests)
                  if ref.generate([p], max_new_tokens=n)[0].text != results[i][0]]
    figures["mismatched_vs_generate_alone"] = mismatched
    t0 = time.perf_counter()
    b = args.max_batch_size
    for first in range(0, len(requests), b):
        batch = requests[first:first + b]
        ref.generate([p for p, _ in batch], max_new_tokens=max(n for _, n in batch))
    static_wall = time.perf_counter() - t0
    figures["static_batches"] = {"wall_s": round(static_wall, 3), "useful_tokens_per_s": round(tokens / static_wall, 2),
                                 "served_speedup": round(static_wall / wall, 2)}
    print(json.dumps(figures, indent=2))
    return 1 if mismatched or len(results) != len(requests) else 0


# -- what the client process runs ------------------------------------------------------------------------------
def served_phase(url, requests, clients):
    return asyncio.run(run_clients(url, "m", requests, clients))


def serial_phase(url, requests) -> tuple[int, float]:
    """The requests one after another, each on a fresh connection: (completion tokens, wall seconds)."""
    async def one(prompt, n) -> int:
        async with httpx.AsyncClient(timeout=600) as client:
            return (await stream_one(client, url, "m", prompt, n))[1]
    t0 = time.perf_counter()
    tokens = sum(asyncio.run(one(p, n)) for p, n in requests)
    return tokens, time.perf_counter() - t0


def stall_phase(url, short_prompts, long_prompt) -> dict:
    return asyncio.run(stall_probe(url, "m", short_prompts, long_prompt))


if __name__ == "__main__":
    sys.exit(main())
