"""An engine in the server's own process: the app over a `Scheduler` stepping in a thread beside it (tests, and
anything that wants one process; `tools.serve` puts the engine in a process of its own, `engine_core.py`)."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..scheduler import Scheduler


class LocalEngine:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.tokenizer = scheduler.rt.tokenizer
        self.context = scheduler.rt.shapes.max_seq_len
        self.ready = asyncio.Event()  # (the model is loaded already)
        self.ready.set()

    @property
    def vocab_size(self) -> int:
        return self.scheduler.rt.config.vocab_size

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @property
    def error(self) -> str | None:
        return None if self.scheduler.error is None else repr(self.scheduler.error)

    def submit(self, request, on_event):
        """Called on the app's event loop; `on_event` runs there too, handed over from the scheduler's thread."""
        loop = asyncio.get_running_loop()
        return self.scheduler.submit(request, lambda event: loop.call_soon_threadsafe(on_event, event))

    async def metrics_text(self) -> str:
        return self.scheduler.metrics.render()
