"""The front end's handle on an engine in another process (`engine_core.py` is the other end of the pipe), with
the surface `create_app` uses: `tokenizer`, `ready`, `context`, `submit`, `metrics_text`, `error`. The limits
(`vocab_size`, `context`, `max_queue`) come from the engine once its model has loaded (`ready` is then set).

Requests are checked here, before they cross, with the same checks the scheduler makes, and the queue is bounded
here: a request counts as waiting from its submission until the engine reports it admitted (or ended), so the
count is never below the engine's own and a full queue answers 429 without a round trip. Everything runs on the
front end's event loop: the pipe is read by a reader callback on that loop."""
from __future__ import annotations

import asyncio
import itertools
import time

from ..metrics import ServingMetrics
from ..request import QueueFull, Request, TokenEvent, check_request
from ..tokenizer import TextTokenizer
from .engine_core import EngineInfo

METRICS_TIMEOUT_S = 10.0


class RemoteHandle:
    def __init__(self, client: "EngineClient", rid: int, request: Request, on_event):
        self.client, self.id, self.request, self.on_event = client, rid, request, on_event
        self.arrived = time.perf_counter()
        self.admitted = False
        self.reused = 0  # prompt tokens the engine did not prefill (told on admission)
        self.first_token_seen = False
        self.finish_reason: str | None = None
        self._cancel_sent = False

    def cancel(self) -> None:
        """The engine frees the row at its next step."""
        if self.finish_reason is None and not self._cancel_sent:
            self._cancel_sent = True
            self.client._send(("cancel", self.id))


class EngineClient:
    """`on_event` callbacks run on the loop that reads the pipe (the app's)."""

    def __init__(self, conn, tokenizer: TextTokenizer):
        self.conn, self.tokenizer = conn, tokenizer
        self.info: EngineInfo | None = None  # the engine's limits, once it is ready
        self.ready = asyncio.Event()  # set with `info`
        self.error: str | None = None
        self.on_engine_exit = None  # called once when the engine's end of the pipe closes
        self._open: dict[int, RemoteHandle] = {}  # rid -> handle until its last event
        self._ids = itertools.count()
        self._tickets: dict[int, asyncio.Future] = {}
        self._ticket_ids = itertools.count()
        self._rejected = 0
        self._ttft_sum, self._ttft_count = 0.0, 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's messages on `loop` (call once, from the loop, before serving)."""
        self._loop = loop
        loop.add_reader(self.conn.fileno(), self._readable)

    # -- what the app calls --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._ready_info().vocab_size

    @property
    def context(self) -> int:
        return self._ready_info().context

    @property
    def max_queue(self) -> int:
        return self._ready_info().max_queue

    def _ready_info(self) -> EngineInfo:
        if self.info is None:
            raise RuntimeError("the model is still loading")
        return self.info

    def submit(self, request: Request, on_event) -> RemoteHandle:
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {self.error}")
        check_request(request, self.vocab_size, self.context, self.tokenizer)
        if sum(not h.admitted for h in self._open.values()) >= self.max_queue:  # waiting for a row
            self._rejected += 1
            mean_ttft = self._ttft_sum / self._ttft_count if self._ttft_count else 1.0
            raise QueueFull(self.max_queue, max(1.0, mean_ttft))
        handle = RemoteHandle(self, next(self._ids), request, on_event)
        self._open[handle.id] = handle
        self._send(("submit", handle.id, request))
        return handle

    async def metrics_text(self) -> str:
        """The engine's counters and histograms (with the front end's 429s), rendered as Prometheus text."""
        if self._closed:
            raise RuntimeError(self.error)
        ticket = next(self._ticket_ids)
        future = self._tickets[ticket] = asyncio.get_running_loop().create_future()
        self._send(("metrics", ticket))
        try:
            metrics: ServingMetrics = await asyncio.wait_for(future, METRICS_TIMEOUT_S)
        finally:
            self._tickets.pop(ticket, None)
        metrics.requests_rejected += self._rejected
        return metrics.render()

    def send_serving(self) -> None:
        """Tell the engine the port is listening and requests are taken."""
        self._send(("serving",))

    # -- the pipe --------------------------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            self._engine_gone()

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._dispatch(self.conn.recv())
        except (EOFError, OSError):
            self._engine_gone()

    def _dispatch(self, msg) -> None:
        kind = msg[0]
        if kind == "step":
            _, events, admitted = msg
            for rid, reused in admitted:
                if rid in self._open:
                    self._open[rid].admitted = True
                    self._open[rid].reused = reused
            for rid, token_id, text, finish, *logprobs in events:
                self._deliver(rid, TokenEvent(rid, token_id, text, finish, *logprobs))
        elif kind == "ready":
            self.info = msg[1]
            self.ready.set()
        elif kind == "metrics":
            future = self._tickets.get(msg[1])
            if future is not None and not future.done():
                future.set_result(msg[2])
        elif kind == "error":
            self.error = msg[1]

    def _deliver(self, rid: int, event: TokenEvent) -> None:
        handle = self._open.get(rid)
        if handle is None:
            return
        if event.token_id >= 0 and not handle.first_token_seen:  # for Retry-After: the mean time to a first token
            handle.first_token_seen = True
            self._ttft_sum += time.perf_counter() - handle.arrived
            self._ttft_count += 1
        if event.finish_reason is not None:
            handle.finish_reason = event.finish_reason
            del self._open[rid]
        if handle.on_event is not None:
            handle.on_event(event)

    def _engine_gone(self) -> None:
        """The engine's process ended: every open request ends with an error, and so does the front end."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.conn.fileno())
        if self.error is None:
            self.error = "the engine process exited"
        for rid in list(self._open):
            self._deliver(rid, TokenEvent(rid, -1, "", "error"))
        for future in self._tickets.values():
            if not future.done():
                future.set_exception(RuntimeError(self.error))
        if self.on_engine_exit is not None:
            self.on_engine_exit()
