"""Live servers on a free loopback port for tests and the load tool: `LiveServer` runs uvicorn in a thread of
this process; `SplitServer` runs the engine in this process (in a thread, or in the caller's thread while other
work runs beside it: `serve_while`) and the front end in a process of its own, as `tools.serve` does."""
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
    """`scheduler` steps here (the engine); HTTP is served by a spawned front-end process.

    As a context manager the engine steps in a thread of its own. `serve_while(work)` steps it in the caller's
    thread instead, as `tools.serve` does, while `work` runs in another: what to use for timing. Every thread that
    runs torch ops keeps its own OpenMP pool, and once the process's pools hold more threads than there are CPUs
    libgomp stops spinning at barriers (its throttled spin count) and its workers sleep and wake at every parallel
    region: stepping in a second thread after the model was loaded in the first left a 2-core machine ~18% idle
    (the scheduler alone, eager, bench preset: 82% CPU and 1.09-1.28x the wall of the same steps in the loading
    thread)."""

    def __init__(self, scheduler, model_dir, name: str, api_key: str | None = None, **spec):
        self.spec = FrontendSpec(None if model_dir is None else str(model_dir), name, port=0, log_level="error",
                                 **spec)
        self.api_key = api_key
        self.scheduler = scheduler
        self.frontend, self.thread = None, None
        self.engine_error: BaseException | None = None  # what the engine's loop raised, if it failed

    def _engine(self) -> None:
        try:
            self.core.run()
        except BaseException as exc:  # the front end has reported it to clients; keep it for the caller
            self.engine_error = exc

    @property
    def url(self) -> str:
        return self.frontend.url

    def __enter__(self) -> "SplitServer":
        self.frontend = start_frontend(self.spec, self.api_key)
        self.core = EngineCore(self.scheduler, self.frontend.conn)
        self.thread = threading.Thread(target=self._engine, name="gptoss-engine", daemon=True)
        self.thread.start()
        try:
            self._wait_serving()
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + 120
        while not self.core.frontend_serving.wait(0.05):
            if time.monotonic() > deadline or not self.frontend.alive():
                raise RuntimeError("the front-end process did not start")

    def __exit__(self, *exc) -> None:
        self.frontend.stop()
        self.thread.join(30)

    def serve_while(self, work):
        """Start the front end, run `work()` in a helper thread once it listens, and step the engine in this
        thread until `work` returns; then stop the front end. Returns what `work` returned (or raises what it
        raised)."""
        self.frontend = start_frontend(self.spec, self.api_key)
        self.core = EngineCore(self.scheduler, self.frontend.conn)

        def when_serving():
            self._wait_serving()
            return work()

        # the front end's pipe closing ends core.run()
        return step_while(self.core.run, when_serving, stop=self.frontend.stop, abort=self.frontend.shutdown)


def step_while(run, work, stop, abort=None):
    """`run()` (an engine's loop) in this thread while `work()` runs in a helper thread, which calls `stop()` once
    `work` has returned or raised, to end `run`. If `run` fails first, `abort()` tells `work` (e.g. the server
    goes away). Returns what `work` returned, or raises what it raised."""
    outcome: dict = {}

    def helper() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            stop()

    thread = threading.Thread(target=helper, name="gptoss-step-while", daemon=True)
    thread.start()
    try:
        run()
    except BaseException:
        if abort is not None:
            abort()
        raise
    finally:
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
