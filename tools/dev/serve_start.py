"""How long `python -m gptoss.tools.serve` takes to start, as a client sees it: from the command to the first answer
of GET /health (503 while the model loads) and to the first 200; then one chat request (its whole time: the first
renders the chat template), one streamed completion (time to its first token and to its last), and the memory of
the engine's and the front end's processes. One JSON line a round; the server is stopped (SIGTERM) after each.

    python -m gptoss.tools.dev.serve_start --model /work/ckpt-20b --rounds 2 [-- extra serve arguments]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil


def one_start(model: str, port: int, extra: list[str], max_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "gptoss.tools.serve", "--model", model, "--port", str(port),
                               *extra], stdout=subprocess.DEVNULL)
    first = ready = None
    try:
        while ready is None:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
            try:
                status = httpx.get(url + "/health", timeout=1).status_code
                first = first or (time.perf_counter() - t0, status)
                ready = time.perf_counter() - t0 if status == 200 else None
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        name = os.path.basename(os.path.normpath(model))
        sent = time.perf_counter()  # a chat (its template rendered in the front end), whole
        httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "temperature": 0}).raise_for_status()
        chat = time.perf_counter() - sent
        sent, first_token = time.perf_counter(), None  # a streamed completion: its first token
        with httpx.stream("POST", url + "/v1/completions", timeout=300, json={
                "model": name, "prompt": "hi", "max_tokens": max_tokens, "stream": True}) as reply:
            for line in reply.iter_lines():
                if first_token is None and line.startswith("data: {"):
                    first_token = time.perf_counter() - sent
        last_token = time.perf_counter() - sent
        engine = psutil.Process(server.pid)
        frontends = [c for c in engine.children() if "frontend" in " ".join(c.cmdline())]
        return {"first_answer_s": round(first[0], 2), "first_status": first[1], "ready_s": round(ready, 2),
                "chat_s": round(chat, 2), "completion_first_token_s": round(first_token, 2),
                "completion_last_token_s": round(last_token, 2),
                "engine_rss_mib": round(engine.memory_info().rss / 2**20),
                "frontend_rss_mib": round(frontends[0].memory_info().rss / 2**20) if frontends else None}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    for _ in range(args.rounds):
        print(json.dumps(one_start(args.model, args.port, extra, args.max_tokens)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
