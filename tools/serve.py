"""Serve a checkpoint over an OpenAI-compatible HTTP API, with continuous batching.

    python -m gptoss.tools.serve --model DIR [--artifacts DIR] [--host 127.0.0.1] [--port 8000]
    torchrun --nproc-per-node N -m gptoss.tools.serve --model DIR --tp N ...   # rank 0 serves HTTP

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true` for server-sent
events), GET /health, GET /metrics (Prometheus text).
"""
from __future__ import annotations

import argparse
import os
import sys

from gptoss.runtime import Runtime
from gptoss.runtime.scheduler import Scheduler
from gptoss.runtime.server.app import DEFAULT_MAX_BODY


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gptoss.tools.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: the "
                                                                  "directory's name)")
    ap.add_argument("--artifacts", default=None, help="compiled-graph directory (loaded, or filled on first use)")
    ap.add_argument("--backend", default="eager", choices=("eager", "inductor", "torchair"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch-size", type=int, default=8, help="cache rows: requests decoded together")
    ap.add_argument("--max-seq-len", type=int, default=4096, help="context per request (prompt + output)")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated decode batch buckets (default: powers "
                                                          "of two up to --max-batch-size)")
    ap.add_argument("--max-queue", type=int, default=None, help="requests that may wait for a row before 429 "
                                                                  "(default: 4 x --max-batch-size)")
    ap.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    ap.add_argument("--device", default=None, help="cpu, cuda, npu (default: cpu)")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel size (= torchrun's --nproc-per-node)")
    ap.add_argument("--log-level", default="warning")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    rt = Runtime.from_pretrained(args.model, backend=args.backend, max_batch_size=args.max_batch_size,
                                 max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk,
                                 batch_sizes=batch_sizes, artifacts=args.artifacts, device=args.device,
                                 tp_size=args.tp)
    scheduler = Scheduler(rt, max_queue=args.max_queue)
    if not rt.is_main_process:  # replay rank 0's schedule until it stops
        scheduler.run()
        return 0

    import uvicorn

    from gptoss.runtime.server import create_app

    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(scheduler, name, max_body_bytes=args.max_body_bytes)
    scheduler.start()
    print(f"serving {name} on http://{args.host}:{args.port} (max batch {rt.shapes.max_batch_size}, context "
          f"{rt.shapes.max_seq_len}, queue {scheduler.max_queue}, tp {rt.model.parallel.tp_size})", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)).run()
    finally:
        scheduler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
