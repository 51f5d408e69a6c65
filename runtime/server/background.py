"""Live servers on a free loopback port for tests and the load tool: `LiveServer` runs uvicorn in a thread of
this process; `SplitServer` runs the engine in a thread of this process and the front end in a process of its
own, as `tools.serve` does."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from .engine_core import EngineCore
from .frontend import FrontendSpec, start_frontend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class SplitServer:
    """`scheduler` steps in a thread here (the engine); HTTP is served by a spawned front-end process."""

    def __init__(self, scheduler, model_dir, name: str, **spec):
        self.spec = FrontendSpec.for_scheduler(scheduler, model_dir, name, port=free_port(), log_level="error",
                                               **spec)
        self.scheduler, self.url = scheduler, self.spec.url
        self.frontend, self.thread = None, None
        self.engine_error: BaseException | None = None  # what the engine's loop raised, if it failed

    def _engine(self) -> None:
        try:
            self.core.run()
        except BaseException as exc:  # the front end has reported it to clients; keep it for the caller
            self.engine_error = exc

    def __enter__(self) -> "SplitServer":
        self.frontend = start_frontend(self.spec)
        self.core = EngineCore(self.scheduler, self.frontend.conn)
        self.thread = threading.Thread(target=self._engine, name="gptoss-engine", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.core.frontend_ready.wait(0.05):
            if time.monotonic() > deadline or not self.frontend.alive():
                self.__exit__()
                raise RuntimeError("the front-end process did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.frontend.stop()
        self.thread.join(30)
