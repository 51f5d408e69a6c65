"""Serve a checkpoint over an OpenAI-compatible HTTP API, with continuous batching.

    python -m gptoss.tools.serve --model DIR [--artifacts DIR] [--host 127.0.0.1] [--port 8000]
    torchrun --nproc-per-node N -m gptoss.tools.serve --model DIR --tp N ...   # rank 0 serves HTTP

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true` for server-sent
events), GET /health, GET /metrics (Prometheus text).
"""
from __future__ import annotations

import argparse
import os

from gptoss.runtime import Runtime
from gptoss.runtime.scheduler import Scheduler
from gptoss.runtime.server.app import DEFAULT_MAX_BODY

from .cli import add_runtime_args, run_cli, settings_from_args


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gptoss.tools.serve", description=__doc__.split("\n\n")[0])
    add_runtime_args(ap, backend_default="eager")
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: the "
                                                                  "directory's name)")
    ap.add_argument("--artifacts", default=None, help="compiled-graph directory (loaded, or filled on first use)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-queue", type=int, default=None, help="requests that may wait for a row before 429 "
                                                                  "(default: 4 x --max-batch-size)")
    ap.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    ap.add_argument("--log-level", default="warning")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = settings_from_args(args, artifacts=args.artifacts)
    if settings.batch_sizes is not None and 1 not in settings.batch_sizes:
        # a newcomer's prompt is prefilled alone, in its own row: the batch-1 graphs must exist
        settings = settings.replace(batch_sizes=(1, *settings.batch_sizes))
    rt = Runtime.from_pretrained(args.model, settings)
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
    run_cli(main)
