"""The front-end process of a split server: uvicorn + the FastAPI app over an `EngineClient`, started by the
engine's process, which keeps the model (`engine_core.py`). It is a fresh interpreter running this module
(`python -m`), not a multiprocessing child, so nothing of the parent (its model, its `__main__`) is imported again;
the two talk over a socket pair wrapped as a `multiprocessing` connection.

    frontend = start_frontend(FrontendSpec(model_dir, "name", port=8000))   # listens at once
    scheduler = Scheduler(Runtime.from_pretrained(model_dir))               # meanwhile /health answers 503
    EngineCore(scheduler, frontend.conn).run()   # until the front end stops
    frontend.stop()

The front end starts before the model loads, so its own start (imports, the tokenizer, the grammar library's
vocabulary) overlaps the load; until the engine says it is ready, every route answers 503 ("loading"), as
llama.cpp's server does. The port is bound here, in the engine's process, before anything loads: a port in use
fails at once, not after the model has loaded.

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

from .app import DEFAULT_MAX_BODY
from .heap import freeze_startup_objects


@dataclass(frozen=True)
class FrontendSpec:
    model_dir: str | None  # its tokenizer files; None: token-id prompts only
    name: str  # the model id clients send
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port (Frontend.url names it)
    max_body_bytes: int = DEFAULT_MAX_BODY
    log_level: str = "warning"
    announce: bool = False  # print where it listens, and a banner once the engine is ready


class Frontend:
    """The running front-end process and the engine's end of its pipe."""

    def __init__(self, spec: FrontendSpec, process: subprocess.Popen, conn: Connection, port: int):
        self.spec, self.process, self.conn = spec, process, conn
        self.url = url(spec.host, port)

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


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # (an IPv6 address in brackets)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (as uvicorn would make it); OSError naming the address if it cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # (uvicorn's backlog) connections made before the front end accepts wait here
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def start_frontend(spec: FrontendSpec, api_key: str | None = None) -> Frontend:
    """Bind the port and start the front end on it; it sends ("serving",) on the pipe once it listens and the
    engine has said it is ready. With `api_key`, the API's routes need it (create_app)."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))  # it imports this package as the parent does
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    with listen(spec.host, spec.port) as sock:  # the front end holds its own copy
        process = subprocess.Popen([sys.executable, "-m", __name__, "--fd", str(theirs.fileno()), "--listen-fd",
                                    str(sock.fileno()), "--spec", json.dumps(asdict(spec))],
                                   pass_fds=(theirs.fileno(), sock.fileno()), env=env)
        port = sock.getsockname()[1]
    theirs.close()
    return Frontend(spec, process, Connection(ours.detach()), port)


def run_frontend(spec: FrontendSpec, conn: Connection, sock: socket.socket) -> None:
    """The front end's main: serve HTTP on `sock` until told to stop or until the engine's process ends."""
    import uvicorn

    from ..tokenizer import TextTokenizer
    from .app import create_app
    from .engine_client import EngineClient

    engine = EngineClient(conn, TextTokenizer(spec.model_dir))
    app = create_app(engine, spec.name, max_body_bytes=spec.max_body_bytes, api_key=os.environ.get(API_KEY_ENV))
    server = uvicorn.Server(uvicorn.Config(app, log_level=spec.log_level))
    freeze_startup_objects()  # this is the front end's own process (its imports, the app, the tokenizer)
    address = url(spec.host, sock.getsockname()[1])

    def engine_exited():
        server.should_exit = True

    async def announce():
        while not server.started:
            await asyncio.sleep(0.02)
        if spec.announce and not engine.ready.is_set():
            print(f"listening on {address}; the model is loading (/health answers 503 until it is ready)",
                  flush=True)
        await engine.ready.wait()
        engine.send_serving()
        if spec.announce:
            info = engine.info
            print(f"serving {spec.name} on {address} (max batch {info.max_batch_size}, context {info.context}, queue "
                  f"{info.max_queue}, tp {info.tp_size})", flush=True)

    async def main():
        engine.on_engine_exit = engine_exited
        engine.attach(asyncio.get_running_loop())
        announcing = asyncio.create_task(announce())  # held: the loop keeps only weak references to tasks
        await server.serve(sockets=[sock])
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
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--spec", required=True)
    args = ap.parse_args()
    run_frontend(FrontendSpec(**json.loads(args.spec)), Connection(args.fd), socket.socket(fileno=args.listen_fd))
