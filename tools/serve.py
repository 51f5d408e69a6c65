"""Serve a checkpoint over an OpenAI-compatible HTTP API, with continuous batching.

    python -m gptoss.tools.serve --model DIR [--artifacts DIR] [--host 127.0.0.1] [--port 8000]
    torchrun --nproc-per-node N -m gptoss.tools.serve --model DIR --tp N ...   # rank 0 serves HTTP

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/responses (`stream: true`
for server-sent events), POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus text). With an
API key (`--api-key`, or the GPTOSS_API_KEY environment variable, which `ps` does not show), every route but
/health and /metrics needs `Authorization: Bearer <key>`. A prompt that begins with tokens a free cache row still holds
(a conversation's earlier turns) is prefilled from where they end (`usage.prompt_tokens_details.cached_tokens`);
`--no-prefix-reuse` turns that off.

The model and its scheduler stay in this process (rank 0's); HTTP is served by a front-end process it starts, so
request parsing and streaming never hold the engine's GIL. The front end starts first and listens while the model
loads (/health answers 503 "loading" until it is ready). Ctrl-C or SIGTERM stops both.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from gptoss.runtime import Runtime, structured
from gptoss.runtime.distributed import is_main_process
from gptoss.runtime.scheduler import Scheduler
from gptoss.runtime.server.app import DEFAULT_MAX_BODY
from gptoss.runtime.server.engine_core import EngineCore
from gptoss.runtime.server.frontend import API_KEY_ENV, FrontendSpec, start_frontend
from gptoss.runtime.server.heap import freeze_startup_objects

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
    ap.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false",
                    help="prefill every prompt from its first token (default: a prompt starts after the tokens a "
                         "free cache row still holds, e.g. a conversation's earlier turns)")
    ap.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    ap.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                    help=f"require 'Authorization: Bearer KEY' on the API's routes (default: ${API_KEY_ENV}; the "
                         f"environment variable keeps the key out of the process list)")
    ap.add_argument("--log-level", default="warning")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = settings_from_args(args, artifacts=args.artifacts)
    if settings.batch_sizes is not None and 1 not in settings.batch_sizes:
        # a newcomer's prompt is prefilled alone, in its own row: the batch-1 graphs must exist
        settings = settings.replace(batch_sizes=(1, *settings.batch_sizes))
    frontend = None
    if is_main_process():  # rank 0 serves HTTP. Its front end starts first: its start overlaps the model's load,
        #                    and a port in use fails before anything loads
        name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
        try:
            frontend = start_frontend(FrontendSpec(
                args.model, name, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
                log_level=args.log_level, announce=True), api_key=args.api_key)
        except OSError as exc:
            print(f"error: {exc.strerror}", file=sys.stderr, flush=True)
            return 1
    try:
        rt = Runtime.from_pretrained(args.model, settings)
        scheduler = Scheduler(rt, max_queue=args.max_queue, reuse_prefixes=args.prefix_reuse)
    except BaseException:
        if frontend is not None:
            frontend.stop()
        raise
    freeze_startup_objects()  # every rank: a full collection on any one would stall them all
    if frontend is None:  # replay rank 0's schedule until it stops
        structured.prepare(rt.tokenizer)  # (as rank 0's engine does: no rank builds it at a first request)
        scheduler.run()
        return 0

    # Ctrl-C reaches both processes; either signal here stops the front end first, whose closing pipe then
    # stops the scheduler between steps (under TP, with the stop plan every rank needs)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: frontend.shutdown())
    core = EngineCore(scheduler, frontend.conn)
    try:
        core.run()
    finally:
        frontend.stop()
    if not core.frontend_serving.is_set():
        print("error: the HTTP front end did not start (its error is above)", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
