"""The front-end process of a split server: uvicorn + the FastAPI app over an `EngineClient`, started by the
engine's process, which keeps the model (`engine_core.py`). It is a fresh interpreter running this module
(`python -m`), not a multiprocessing child, so nothing of the parent (its model, its `__main__`) is imported again;
the two talk over a socket pair wrapped as a `multiprocessing` connection.

    frontend = start_frontend(FrontendSpec.for_scheduler(scheduler, model_dir, "name", port=8000))
    EngineCore(scheduler, frontend.conn).run()   # until the front end stops
    frontend.stop()

The front end stops when the engine's end of the pipe closes (the engine's process ended), and the engine stops
when the front end's closes (Ctrl-C, SIGTERM, `Frontend.shutdown`): neither outlives the other."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection

from ..scheduler import Scheduler
from .app import DEFAULT_MAX_BODY


@dataclass(frozen=True)
class FrontendSpec:
    model_dir: str | None  # its tokenizer files; None: token-id prompts only
    name: str  # the model id clients send
    vocab_size: int
    context: int  # max_seq_len
    max_queue: int
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = DEFAULT_MAX_BODY
    log_level: str = "warning"
    banner: str = ""  # printed once the port is listening

    @classmethod
    def for_scheduler(cls, scheduler: Scheduler, model_dir, name: str, **kw) -> "FrontendSpec":
        rt = scheduler.rt
        return cls(None if model_dir is None else str(model_dir), name, rt.config.vocab_size,
                   rt.shapes.max_seq_len, scheduler.max_queue, **kw)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Frontend:
    """The running front-end process and the engine's end of its pipe."""

    def __init__(self, spec: FrontendSpec, process: subprocess.Popen, conn: Connection):
        self.spec, self.process, self.conn = spec, process, conn
        self.url = spec.url

    def alive(self) -> bool:
        return self.process.poll() is None

    def shutdown(self) -> None:
        """Ask the front end to stop (uvicorn's graceful SIGTERM); the engine sees its end of the pipe close.
        Safe in a signal handler."""
        if self.process.returncode is None:
            self.process.terminate()

    def stop(self, timeout: float = 10) -> None:
        self.shutdown()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
        self.conn.close()


API_KEY_ENV = "GPTOSS_API_KEY"  # how the front end gets the key: in its environment, not on its command line


def start_frontend(spec: FrontendSpec, api_key: str | None = None) -> Frontend:
    """Start the front end; it sends ("ready",) on the pipe once its port listens. With `api_key`, the API's
    routes need it (create_app)."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))  # it imports this package as the parent does
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    process = subprocess.Popen([sys.executable, "-m", __name__, "--fd", str(theirs.fileno()), "--spec",
                                json.dumps(asdict(spec))], pass_fds=(theirs.fileno(),), env=env)
    theirs.close()
    return Frontend(spec, process, Connection(ours.detach()))


def run_frontend(spec: FrontendSpec, conn: Connection) -> None:
    """The front end's main: serve HTTP until told to stop or until the engine's process ends."""
    import uvicorn

    from ..tokenizer import TextTokenizer
    from .app import create_app
    from .engine_client import EngineClient

    engine = EngineClient(conn, TextTokenizer(spec.model_dir), spec.vocab_size, spec.context, spec.max_queue)
    app = create_app(engine, spec.name, max_body_bytes=spec.max_body_bytes, api_key=os.environ.get(API_KEY_ENV))
    server = uvicorn.Server(uvicorn.Config(app, host=spec.host, port=spec.port, log_level=spec.log_level))

    def engine_exited():
        server.should_exit = True

    async def announce():
        while not server.started:
            await asyncio.sleep(0.02)
        engine.send_ready()
        if spec.banner:
            print(spec.banner, flush=True)

    async def main():
        engine.on_engine_exit = engine_exited
        engine.attach(asyncio.get_running_loop())
        announcing = asyncio.create_task(announce())  # held: the loop keeps only weak references to tasks
        await server.serve()
        announcing.cancel()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled
        pass
    finally:
        conn.close()  # the engine sees the front end go and stops


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="a split server's front end (started by the engine's process)")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--spec", required=True)
    args = ap.parse_args()
    run_frontend(FrontendSpec(**json.loads(args.spec)), Connection(args.fd))
