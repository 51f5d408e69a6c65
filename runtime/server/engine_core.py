"""The engine's side of a server split over two processes: the scheduler steps here (rank 0's process, which
owns the model) while a front-end process runs HTTP, JSON and streaming (`frontend.py`).

Why two processes: in one, the HTTP event loop and every streaming response share the engine's GIL, which the
engine gives up and must get back around every graph call and op of a step. Measured on 2-core machines
(BENCHMARKS.md, serving; compiled graphs): the same requests took 3.0x as long served from one process (server and
clients, a Xeon) as through the scheduler alone, and 1.17-1.37x with the server split this way and the clients in
a third process (a Zen 4); the rest is the front end and the clients sharing the 2 cores with the engine.
Apart, the engine's process holds only the scheduler and this link.

Over a `multiprocessing` pipe:
- to the engine: ("serving",) once the front end listens and knows the engine is ready, ("submit", rid, Request),
  ("cancel", rid), ("metrics", ticket);
- to the front end: ("ready", EngineInfo) when the engine starts stepping (its model loaded), ("step", [(rid,
  token_id, text, finish_reason[, logprob, top_logprobs, prompt_logprobs]), ...], [(admitted rid, prompt tokens
  reused), ...]) once per scheduler step that produced anything, ("metrics", ticket, ServingMetrics), ("error",
  message) when the model failed (every open request has then had its "error" event).
The front end closing its end stops the engine.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import structured
from ..request import Request

if TYPE_CHECKING:  # (the front end imports EngineInfo from here, and must not load torch)
    from ..scheduler import Handle, Scheduler


@dataclass(frozen=True)
class EngineInfo:
    """What the front end learns from the engine once its model is loaded: the limits it checks requests against."""
    vocab_size: int
    context: int  # max_seq_len
    max_queue: int
    max_batch_size: int
    tp_size: int

    @classmethod
    def of(cls, scheduler: Scheduler) -> "EngineInfo":
        rt = scheduler.rt
        return cls(rt.config.vocab_size, rt.shapes.max_seq_len, scheduler.max_queue, rt.shapes.max_batch_size,
                   rt.model.parallel.tp_size)


class EngineCore:
    def __init__(self, scheduler: Scheduler, conn):
        self.scheduler, self.conn = scheduler, conn
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # the outbox and the handle table: reader thread vs scheduler thread
        self._events: list[tuple] = []
        self._admitted: list[tuple[int, int]] = []
        self._handles: dict[int, Handle] = {}  # rid -> handle, for cancellation, until the request ends
        self._ended: set[int] = set()  # rids that ended before their submit returned (not yet in _handles)
        self.frontend_serving = threading.Event()  # the front end said it listens and knows the engine is ready
        scheduler.on_admit = self._on_admit
        scheduler.after_step = self.flush
        structured.prepare(scheduler.rt.tokenizer)

    def run(self) -> None:
        """Step the scheduler in this thread until the front end closes the pipe. After a model failure, keep
        answering (every new request fails) until then, and re-raise the failure."""
        reader = threading.Thread(target=self._read, name="gptoss-engine-link", daemon=True)
        reader.start()
        self._send(("ready", EngineInfo.of(self.scheduler)))
        try:
            self.scheduler.run()
        except BaseException as exc:
            self.flush()
            self._send(("error", f"{type(exc).__name__}: {exc}"))
            reader.join()
            raise
        reader.join()

    # -- the scheduler's thread ----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Send what the last step produced, in one message."""
        with self._lock:
            events, admitted = self._events, self._admitted
            self._events, self._admitted = [], []
        if events or admitted:
            self._send(("step", events, admitted))

    def _on_admit(self, handle: Handle) -> None:
        with self._lock:
            self._admitted.append((handle.tag, handle.reused))

    def _on_event(self, rid: int, event) -> None:
        with self._lock:
            event_tuple = (rid, event.token_id, event.text, event.finish_reason)
            if event.logprob is not None or event.prompt_logprobs is not None:  # (where asked: events stay small)
                event_tuple += (event.logprob, event.top_logprobs, event.prompt_logprobs)
            self._events.append(event_tuple)
            if event.finish_reason is not None and self._handles.pop(rid, None) is None:
                self._ended.add(rid)

    # -- the reader thread ---------------------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the front end went away: stop serving
                break
            kind = msg[0]
            if kind == "submit":
                self._submit(msg[1], msg[2])
            elif kind == "cancel":
                with self._lock:
                    handle = self._handles.get(msg[1])
                if handle is not None:
                    handle.cancel()
            elif kind == "serving":
                self.frontend_serving.set()
            elif kind == "metrics":
                self._send(("metrics", msg[1], self.scheduler.metrics))
        self.scheduler.stop(timeout=0)

    def _submit(self, rid: int, request: Request) -> None:
        try:
            handle = self.scheduler.submit(request, lambda event: self._on_event(rid, event), tag=rid)
        except Exception:  # the front end checked the request and bounds the queue: only a failed model is left
            with self._lock:
                self._events.append((rid, -1, "", "error"))
            self.flush()
            return
        with self._lock:
            if rid in self._ended:
                self._ended.discard(rid)
            else:
                self._handles[rid] = handle

    def _send(self, msg) -> None:
        with self._send_lock:
            try:
                self.conn.send(msg)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                pass  # the front end is gone; the reader sees the pipe close and stops the scheduler
