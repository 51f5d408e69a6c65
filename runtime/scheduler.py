"""Continuous batching over the Runtime's static cache and graphs.

Every cache row holds at most one request. Each step:
1. waiting requests take free rows (the lowest free row first, so the rows in use stay packed at the front and
   the decode batch stays in a small bucket, unless a row holds the beginning of the prompt: prefix_reuse.py);
   one whose first prefill chunk or more another row is still prefilling waits for it, then copies it;
   cancelled requests give theirs back;
2. one request that is still reading its prompt runs one prefill chunk, as a batch-1 graph on its own row of
   the cache (a view of that row); while other rows decode, the chunk is at most the ShapePlan's
   `interleave_chunk` tokens, so a step of the running streams waits for a short chunk, not a full one. When no
   row decodes and the prefilling rows stand at the same full-chunk boundary (a burst of newcomers), their
   chunks run together in one batched prefill graph instead, as `Runtime.generate` runs a static batch;
3. every row that is generating runs one decode step together, as a graph of the smallest batch bucket that
   covers the highest such row; a row that ends frees itself in the same step.

So a long prompt enters one chunk per step while the running streams keep getting a token every step, and only
the shapes of the Runtime's ShapePlan ever run: nothing new is traced or compiled while serving.

Mixed steps (a ShapePlan with `mixed`): steps 2 and 3 run as one graph whenever the chunk is a whole
`interleave_chunk`, so the step reads the weights once for the chunk and the decode rows together. The chunk's
tokens are written to the cache's staging row (the prompt's earlier positions are copied there first, once), and
the prompt is copied to its own row when it ends; one prompt at a time is staged, and it keeps the staging row
until its prompt ends.

Rows in the decode bucket that are not generating (free, or still prefilling) are fed a dummy token whose cache
write lands where it cannot be read: at position 0 of a free row or of a staged prompt's row (overwritten when
the prompt is copied in), or at the next position a prefilling row's next chunk overwrites before attending to
it.

Tensor parallelism: rank 0 owns the queue. At every step it broadcasts that step's admissions and
cancellations (a small pickled plan, gloo/nccl/hccl object broadcast); every rank applies the same plan to the
same state, so all ranks run the same graphs on the same rows, and the sampled tokens are broadcast from rank 0
as in `Runtime.generate`. While idle, rank 0 sends an empty plan every `idle_heartbeat_s` so the other ranks'
collectives never time out.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .metrics import ServingMetrics
from .prefix_reuse import PrefixReuse, common_prefix
from .request import QueueFull, Request, TokenEvent, check_request
from .runtime import Runtime, _Sequence, steer
from .sampling import LogitAdjustments, greedy, positions_logprobs, sample, token_logprobs
from .token_constraint import TokenConstraint
from .tokenizer import IncrementalDetokenizer


class Handle:
    """One submitted request. `on_event(TokenEvent)` is called from the scheduler's thread for every token; the
    last event has `finish_reason` set ("stop", "length", or "cancelled")."""

    def __init__(self, rid: int, request: Request, on_event: Callable[[TokenEvent], None] | None, tag=None):
        self.id, self.request, self.on_event, self.tag = rid, request, on_event, tag
        self.cancelled = False
        self.arrived = time.perf_counter()
        self.last_token_at: float | None = None
        self.reused = 0  # prompt tokens it did not prefill: their K/V were still in its row (prefix_reuse.py)
        self.finish_reason: str | None = None
        self.done = threading.Event()

    def cancel(self) -> None:
        """Thread-safe; the row is freed at the next step."""
        self.cancelled = True


@dataclass
class _Row:
    handle: Handle
    seq: _Sequence
    stop_ids: set[int]
    stop_strings: list[str]
    generator: torch.Generator | None
    padded: torch.Tensor  # the prompt, zero-padded to the cache's slot count
    # (log-probability, alternatives) of prompt tokens 1, 2, ... so far, where the request asked and this rank
    # delivers its events; handed over with the first event
    prompt_scores: list | None = None
    done: int = 0  # prompt tokens prefilled
    pos: int = 0  # next cache position to write while decoding
    next_token: int = 0
    staged: bool = False  # the prompt is being prefilled on the cache's staging row (mixed steps)
    written: int = 0  # one past the highest position of this request written (on its row or the staging row)

    @property
    def prefilling(self) -> bool:
        return self.done < len(self.seq.prompt)


@dataclass
class _Plan:
    admit: list[tuple[int, Request]] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)
    stop: bool = False


def _select_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows]: a view where the rows are consecutive (the usual decode batch), else one gather (indexing with a
    list copies through a slower path: ~0.2 ms for a step's [8, 16k] logits)."""
    if rows and rows[-1] - rows[0] == len(rows) - 1:
        return t[rows[0]:rows[-1] + 1]
    return t.index_select(0, torch.tensor(rows, dtype=torch.long, device=t.device))


class Scheduler:
    def __init__(self, runtime: Runtime, *, max_queue: int | None = None, idle_heartbeat_s: float = 1.0,
                 reuse_prefixes: bool = True):
        self.rt = runtime
        self.rows: list[_Row | None] = [None] * runtime.shapes.max_batch_size
        self.reuse = PrefixReuse(runtime.cache, runtime.shapes, enabled=reuse_prefixes,
                                 any_start="prefill" in runtime.graphs.python_kinds)
        self._graph_calls = runtime.graphs.calls  # after our last step: more means another caller wrote the cache
        self.max_queue = 4 * runtime.shapes.max_batch_size if max_queue is None else max_queue
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        self.idle_heartbeat_s = idle_heartbeat_s
        self.metrics = ServingMetrics()
        self._waiting: deque[Handle] = deque()
        self._handles: dict[int, Handle] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.parallel = runtime.model.parallel
        self.graph_calls: list[tuple] = []  # (kind, batch, steps, kv_len) of every graph call, when recording
        self.record_graph_calls = False
        # rank 0's loop, for an engine serving another process: told of each admission (the request left the
        # queue for a row), and called after every step (a place to send that step's events in one message)
        self.on_admit: Callable[[Handle], None] | None = None
        self.after_step: Callable[[], None] | None = None

    # -- requests ----------------------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise ValueError/TypeError naming the problem, before a request is queued."""
        check_request(request, self.rt.config.vocab_size, self.rt.shapes.max_seq_len, self.rt.tokenizer)

    def submit(self, request: Request, on_event: Callable[[TokenEvent], None] | None = None, tag=None) -> Handle:
        """Queue `request`; `on_event` gets its tokens (from the scheduler's thread); `tag` is the caller's name
        for it, kept on the handle."""
        self.check(request)
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the scheduler stopped after an error: {self.error!r}")
            if len(self._waiting) >= self.max_queue:
                self.metrics.requests_rejected += 1
                raise QueueFull(self.max_queue, self._retry_after())
            handle = Handle(next(self._ids), request, on_event, tag)
            self._waiting.append(handle)
            self._handles[handle.id] = handle
            self.metrics.queue_depth = len(self._waiting)
            self._wake.notify()
        return handle

    def _retry_after(self) -> float:
        """A guess at when a row frees: the mean request time so far, at least a second."""
        ttft = self.metrics.ttft
        return max(1.0, ttft.sum / ttft.count if ttft.count else 1.0)

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self.rows)

    # -- the loop ----------------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        """Run the loop in a background thread (rank 0 of a server). Where the model has already run torch ops
        in the calling thread with several threads, the two OpenMP pools together outnumber the CPUs and libgomp
        then sleeps at every barrier instead of spinning: on a 2-core machine stepping this way left the cores
        ~18% idle. For speed, call `run()` in the thread that loaded the model (as `tools.serve` does)."""
        self._thread = threading.Thread(target=self.run, name="gptoss-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Steps until `stop` (rank 0) or until rank 0's plan says stop (other ranks)."""
        try:
            with torch.no_grad():
                while True:
                    plan = self._next_plan()
                    if plan.stop:
                        break
                    self._apply(plan)
                    self._compute()
                    if self.after_step is not None:
                        self.after_step()
        except BaseException as exc:  # the model failed: fail every request rather than leave clients waiting
            self.error = exc
            with self._lock:
                for h in list(self._handles.values()):
                    self._finish(h, "error")
            raise

    def step(self) -> None:
        """One step in the caller's thread (single process): admit, cancel, run the model once."""
        with torch.no_grad():
            self._apply(self._collect_plan())
            self._compute()

    def run_until_idle(self) -> None:
        """Step until every submitted request has ended (tests and offline use, single process)."""
        while self.busy:
            self.step()

    # -- plans: what changes between steps ---------------------------------------------------------------------
    def _collect_plan(self) -> _Plan:
        plan = _Plan()
        with self._lock:
            free = sum(r is None for r in self.rows)
            for row in self.rows:
                if row is not None and row.handle.cancelled:
                    plan.cancel.append(row.handle.id)
                    free += 1
            deferred = deque()
            while self._waiting and free:
                h = self._waiting.popleft()
                if h.cancelled:
                    self._finish(h, "cancelled")
                    continue
                if not h.request.scores_prompt and self._worth_waiting(h.request.prompt, plan):
                    deferred.append(h)
                    continue
                plan.admit.append((h.id, h.request))
                free -= 1
            deferred.extend(self._waiting)
            self._waiting = deque(h for h in deferred if not (h.cancelled and self._finish(h, "cancelled")))
            self.metrics.queue_depth = len(self._waiting)
            plan.stop = self._stopping
        return plan

    def _worth_waiting(self, prompt, plan: _Plan) -> bool:
        """Whether a waiting prompt should wait for a row that is prefilling the same beginning (or a request
        admitted in this plan): once that prompt is in, its K/V are copied instead of computed again (n choices of
        one request, a burst sharing a system prompt). Only for at least a prefill chunk in common."""
        if not self.reuse.enabled:
            return False
        enough = self.rt.shapes.prefill_chunk
        others = [r.seq.prompt for r in self.rows if r is not None and r.prefilling and not r.handle.cancelled]
        others += [request.prompt for _, request in plan.admit]
        return any(common_prefix(other, prompt) >= enough for other in others)

    def _next_plan(self) -> _Plan:
        if self.parallel.rank == 0:
            with self._lock:
                if not self.busy and not self._stopping:
                    self._wake.wait(self.idle_heartbeat_s)
            plan = self._collect_plan()
        else:
            plan = None
        if self.parallel.tp_size > 1:
            box = [plan]
            torch.distributed.broadcast_object_list(box, src=0)
            plan = box[0]
        return plan

    def _apply(self, plan: _Plan) -> None:
        if self.rt.graphs.calls != self._graph_calls:  # e.g. Runtime.generate ran on this cache between steps
            self.reuse.forget_all()
        for rid in plan.cancel:
            for i, row in enumerate(self.rows):
                if row is not None and row.handle.id == rid:
                    self._release(i, "cancelled")
        for rid, request in plan.admit:
            handle = self._handles.get(rid) or Handle(rid, request, None)  # other ranks: no client to tell
            scoring = request.scores_prompt  # every prompt position computed: nothing to reuse
            busy = {i: self._held(i) for i, r in enumerate(self.rows) if r is not None} \
                if self.reuse.enabled and not scoring else None
            free, start = self.reuse.choose([i for i, r in enumerate(self.rows) if r is None],
                                            () if scoring else request.prompt, busy)
            handle.reused = start
            if self.on_admit is not None and rid in self._handles:
                self.on_admit(handle)
            self.rows[free] = self._new_row(handle)
            self.rows[free].done = self.rows[free].written = start
            if start:
                with self.metrics.lock:
                    self.metrics.prompt_tokens_reused += start
            with self.metrics.lock:
                self.metrics.running_rows = sum(r is not None for r in self.rows)

    def _new_row(self, handle: Handle) -> _Row:
        req, rt = handle.request, self.rt
        stop_ids, stop_strings = rt._parse_stop(list(req.stop))
        if not req.ignore_eos:
            stop_ids |= rt.eos_ids
        generator = None
        if req.seed is not None:
            generator = torch.Generator(device=rt.device).manual_seed(req.seed)
        prompt = list(req.prompt)
        budget = min(req.max_tokens, rt.shapes.max_seq_len - len(prompt))
        padded = torch.zeros(rt.shapes.slots, dtype=torch.long)
        padded[:len(prompt)] = torch.tensor(prompt)
        adjust = LogitAdjustments.of(prompt, presence=req.presence_penalty, frequency=req.frequency_penalty,
                                     repetition=req.repetition_penalty, bias=req.logit_bias, device=rt.device)
        constraint = TokenConstraint(req.grammar, rt.tokenizer) if req.grammar is not None else None
        seq = _Sequence(handle.id, prompt, budget, IncrementalDetokenizer(rt.tokenizer), adjust=adjust,
                        constraint=constraint)
        scores = [] if req.scores_prompt and handle.on_event is not None else None
        return _Row(handle, seq, stop_ids, stop_strings, generator, padded.to(rt.device), prompt_scores=scores)

    # -- one step of model work --------------------------------------------------------------------------------
    def _compute(self) -> None:
        prefilling = [i for i, r in enumerate(self.rows) if r is not None and r.prefilling]
        decoding = any(r is not None and not r.prefilling for r in self.rows)
        ran = mixed = False
        together = self._prefill_together(prefilling, decoding)
        if together:
            self._prefill_rows(together)
            ran = True
        elif prefilling:  # the staged prompt, else the oldest admitted first: lowest id
            staged = [i for i in prefilling if self.rows[i].staged]
            i = staged[0] if staged else min(prefilling, key=lambda i: self.rows[i].handle.id)
            mixed = self._mixes(i, decoding) and not self.rows[i].handle.request.scores_prompt
            if mixed:
                self._mixed_step(i)  # the decode rows' step included
            else:
                self._prefill_chunk(i)
            ran = True
        if not mixed and any(r is not None and not r.prefilling for r in self.rows):
            self._decode_step()
            ran = True
        self._graph_calls = self.rt.graphs.calls
        if ran:
            with self.metrics.lock:
                self.metrics.steps += 1

    def _prefill_together(self, prefilling: list[int], decoding: bool) -> list[int] | None:
        """Rows whose next chunk can run as one batched prefill, as `Runtime.generate` runs a static batch: when
        no row decodes (so no running stream waits for it) and every prefilling row stands at the same whole
        number of full chunks (a burst of newcomers, all at 0), their chunks share the batch's prefill graph.
        Otherwise (or while a prompt is on the staging row) None: one row at a time."""
        if decoding or len(prefilling) < 2 or any(self.rows[i].staged for i in prefilling):
            return None
        if any(self.rows[i].handle.request.scores_prompt for i in prefilling):
            return None  # (a scored prompt runs on its own, through the model's Python)
        done = {self.rows[i].done for i in prefilling}
        if len(done) != 1 or next(iter(done)) % self.rt.shapes.prefill_chunk:
            return None
        return prefilling

    def _prefill_rows(self, rows: list[int]) -> None:
        """One prefill chunk for several rows (the same `done`) in one graph call of the smallest batch bucket that
        holds them. Free rows in the bucket run a dummy chunk at position 0, which a later prompt overwrites before
        reading; a row whose prompt ends inside the chunk gets its first token, as in `_prefill_chunk`."""
        rt, shapes = self.rt, self.rt.shapes
        done = self.rows[rows[0]].done
        batch = shapes.batch(max(rows) + 1)
        chunk = shapes.chunk(done, max(len(self.rows[i].seq.prompt) for i in rows) - done, batch=batch)
        ids = torch.zeros(batch, chunk, dtype=torch.long, device=rt.device)
        start = torch.zeros(batch, dtype=torch.long)
        last = torch.zeros(batch, dtype=torch.long)
        for i in rows:
            row = self.rows[i]
            ids[i] = row.padded[done:done + chunk]
            start[i] = done
            last[i] = min(max(len(row.seq.prompt) - 1 - done, 0), chunk - 1)
            row.written = max(row.written, done + chunk)
            self.reuse.wrote(i, done + chunk)
        for i in range(batch):
            if self.rows[i] is None:  # its dummy chunk overwrites positions 0 .. chunk - 1
                self.reuse.forget(i)
                self.reuse.wrote(i, chunk)
        keys, values = rt.cache.rows(batch)
        logits = self._graph("prefill", rt.graphs.prefill, ids, start.to(rt.device), last.to(rt.device), keys,
                             values, shapes.kv_len(done + chunk))
        self._prefilled(rows, chunk, _select_rows(logits, rows))

    def _prefilled(self, rows: list[int], chunk: int, logits: torch.Tensor) -> None:
        """After a prefill chunk of `rows` (logits[j] is row rows[j]'s at its last prompt token in the chunk): each
        row moves on by the chunk, and a row whose prompt has ended gets its first token."""
        finished = []
        for j, i in enumerate(rows):
            self.rows[i].done += chunk
            if not self.rows[i].prefilling:
                finished.append(j)
                if not self.rows[i].staged:  # (a staged prompt reaches its row when it is copied there)
                    self.reuse.prompt_done(i, len(self.rows[i].seq.prompt))
        if not finished:
            return
        ended = [rows[j] for j in finished]
        with self.metrics.lock:
            self.metrics.prompt_tokens += sum(len(self.rows[i].seq.prompt) for i in ended)
        for i in ended:
            if self.rows[i].seq.budget == 0:  # max_tokens 0 (a scored prompt): it ends without a token
                self.rows[i].pos = len(self.rows[i].seq.prompt)
                self._release(i, "length")
        finished = [j for j in finished if self.rows[rows[j]] is not None]
        ended = [rows[j] for j in finished]
        if not ended:
            return
        tokens = self._sample(_select_rows(logits, finished).float(), [self.rows[i] for i in ended])
        for j, i, token in zip(finished, ended, tokens):
            self.rows[i].pos = len(self.rows[i].seq.prompt)
            self._take(i, token, logits[j])

    def _graph(self, kind: str, fn, ids, *args):
        if self.record_graph_calls:
            self.graph_calls.append((kind, ids.shape[0], ids.shape[1] if ids.dim() == 2 else 1, args[-1]))
        return fn(ids, *args)

    def _prefill_chunk(self, i: int) -> None:
        """Row i's next chunk as a batch-1 prefill on its own row of the cache, or on the staging row where its
        prompt is staged (mixed steps: a last chunk shorter than a mixed step's runs apart, at its own length)."""
        row, rt = self.rows[i], self.rt
        shapes, length = rt.shapes, len(row.seq.prompt)
        others_decode = any(r is not None and not r.prefilling for j, r in enumerate(self.rows) if j != i)
        chunk = shapes.chunk(row.done, length - row.done, interleaved=others_decode)
        ids = row.padded[row.done:row.done + chunk].clone()[None]
        start = torch.tensor([row.done], device=rt.device)
        last = torch.tensor([min(max(length - 1 - row.done, 0), chunk - 1)], device=rt.device)
        if row.staged:
            keys, values = rt.cache.staging()
        else:
            keys = [k[i:i + 1] for k in rt.cache.keys]  # this row of the cache, written in place
            values = [v[i:i + 1] for v in rt.cache.values]
            self.reuse.wrote(i, row.done + chunk)
        row.written = max(row.written, row.done + chunk)
        if row.handle.request.scores_prompt:
            logits = self._scored_chunk(row, ids, start, last, keys, values, shapes.kv_len(row.done + chunk))
        else:
            logits = self._graph("prefill", rt.graphs.prefill, ids, start, last, keys, values,
                                 shapes.kv_len(row.done + chunk))
        self._prefilled([i], chunk, logits)
        if row.staged and not row.prefilling:
            self._unstage(i, row)

    def _scored_chunk(self, row: _Row, ids, start, last, keys, values, kv_len: int) -> torch.Tensor:
        """A chunk of a prompt whose tokens' log-probabilities were asked for: logits at every token (the
        model's Python: no graph, so not in `graph_calls`), each next prompt token's figures kept on the row;
        returns the chunk's last-token logits, as the prefill graph would."""
        every = self.rt.graphs.prefill_scored(ids, start, keys, values, kv_len)[0]  # [T, vocab]
        if row.prompt_scores is not None:
            prompt = row.seq.prompt
            targets = prompt[row.done + 1:row.done + ids.shape[1] + 1]  # token t + 1 of the prompt, from logits t
            row.prompt_scores += positions_logprobs(every[:len(targets)], targets, row.handle.request.prompt_logprobs)
        return every[int(last[0])][None]

    def _decode_inputs(self):
        """The decode step's rows: (batch bucket, ids, pos, live rows). Rows in the bucket that do not decode get
        a dummy token whose cache write nothing reads: position 0 of a free row or of a staged one (its own row
        is overwritten when its prompt is copied in), a prefilling row's next chunk's first position."""
        decoding = [i for i, r in enumerate(self.rows) if r is not None and not r.prefilling]
        batch = self.rt.shapes.batch(max(decoding) + 1 if decoding else 1)
        ids, pos = [0] * batch, [0] * batch  # (lists, made tensors once: item writes to a tensor cost µs each)
        for i in range(batch):
            row = self.rows[i]
            if row is None:
                pos[i] = self.reuse.idle_position(i)
            elif row.prefilling and not row.staged:
                pos[i] = row.done
            elif not row.prefilling:
                ids[i], pos[i] = row.next_token, row.pos
                row.written = max(row.written, row.pos + 1)
            self.reuse.wrote(i, pos[i] + 1)
        return batch, torch.tensor(ids), torch.tensor(pos), decoding

    def _decode_step(self) -> None:
        rt = self.rt
        batch, ids, pos, live = self._decode_inputs()
        kv_len = rt.shapes.kv_len(max(self.rows[i].pos for i in live) + 1)
        logits = self._graph("decode", rt.graphs.decode, ids.to(rt.device), pos.to(rt.device),
                             *rt.cache.rows(batch), kv_len)
        self._decoded(live, _select_rows(logits, live))

    def _decoded(self, live: list[int], logits: torch.Tensor) -> None:
        """After a decode step (logits[j] is row live[j]'s): each row samples its token."""
        if not live:
            return
        for i in live:
            self.rows[i].pos += 1
        tokens = self._sample(logits.float(), [self.rows[i] for i in live])
        for j, (i, token) in enumerate(zip(live, tokens)):
            self._take(i, token, logits[j])

    def _mixes(self, i: int, decoding: bool) -> bool:
        """Whether row i's next chunk runs in a mixed step: the plan has them, the chunk is a whole interleave chunk
        (a shorter one ends the prompt: it runs apart, at its own length), and the row is staged already or rows
        decode."""
        shapes, row = self.rt.shapes, self.rows[i]
        if not shapes.mixed:
            return False
        chunk = shapes.chunk(row.done, len(row.seq.prompt) - row.done, interleaved=True)
        return chunk == shapes.interleave_chunk and (row.staged or decoding)

    def _mixed_step(self, i: int) -> None:
        """Row i's next chunk (on the staging row) and every decoding row's step, as one graph call."""
        rt, shapes, row = self.rt, self.rt.shapes, self.rows[i]
        cache = rt.cache
        if not row.staged:  # the prompt's positions so far move to the staging row, once
            cache.copy_row(i, cache.staging_row, row.done)
            row.staged = True
        chunk, length = shapes.interleave_chunk, len(row.seq.prompt)
        row.written = max(row.written, row.done + chunk)
        batch, ids, pos, live = self._decode_inputs()
        kv_len = shapes.kv_len(row.done + chunk)  # the chunk's: the decode rows read their whole cache
        chunk_ids = row.padded[row.done:row.done + chunk][None]
        start = torch.tensor([row.done], device=rt.device)
        last = torch.tensor([min(max(length - 1 - row.done, 0), chunk - 1)], device=rt.device)
        if self.record_graph_calls:
            self.graph_calls.append(("mixed", batch, chunk, kv_len))
        logits = rt.graphs.mixed(ids.to(rt.device), pos.to(rt.device), *cache.rows(batch), chunk_ids, start, last,
                                 *cache.staging(), kv_len)
        self._decoded(live, _select_rows(logits, live))
        self._prefilled([i], chunk, logits[batch:])
        if not row.prefilling:
            self._unstage(i, row)

    def _unstage(self, i: int, row: _Row) -> None:
        """Row i's staged prompt has ended: it moves to its own row (if the request has not ended already)."""
        cache = self.rt.cache
        if self.rows[i] is row:
            cache.copy_row(cache.staging_row, i, len(row.seq.prompt))
            self.reuse.wrote(i, row.written)
            self.reuse.prompt_done(i, len(row.seq.prompt))
        row.staged = False

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Each row with its own settings, grammar and generator; greedy rows in one argmax (`logits` stay the
        model's: the caller reports log-probabilities from them)."""
        logits = steer(logits, [row.seq for row in rows])
        out = greedy(logits)
        for j, row in enumerate(rows):
            req = row.handle.request
            if req.temperature > 0:
                out[j] = sample(logits[j:j + 1], req.temperature, req.top_k, req.top_p, row.generator, req.min_p)[0]
        return self.parallel.broadcast(out).tolist()

    def _take(self, i: int, token: int, logits: torch.Tensor) -> None:
        """Row i's sampled `token` (from `logits`, its row's): stop checks, text, the event, the metrics."""
        row = self.rows[i]
        event = self.rt._accept(row.seq, token, row.stop_ids, row.stop_strings)
        row.next_token = token
        now = time.perf_counter()
        h = row.handle
        if h.request.logprobs is not None and h.on_event is not None:  # (only rank 0's handles deliver events)
            event.logprob, event.top_logprobs = token_logprobs(logits, token, h.request.logprobs)
        event.prompt_logprobs = self._prompt_scores(row)
        with self.metrics.lock:
            self.metrics.tokens_generated += 1
            if h.last_token_at is None:
                self.metrics.ttft.observe(now - h.arrived)
            else:
                self.metrics.inter_token.observe(now - h.last_token_at)
        h.last_token_at = now
        if h.on_event is not None:
            h.on_event(event)
        if event.finish_reason is not None:
            self._free(i)
            self._done(h, event.finish_reason)

    def _release(self, i: int, reason: str) -> None:
        h, scores = self.rows[i].handle, self._prompt_scores(self.rows[i])
        self._free(i)
        if h.on_event is not None:
            h.on_event(TokenEvent(h.id, -1, "", reason, prompt_logprobs=scores))
        self._done(h, reason)

    @staticmethod
    def _prompt_scores(row: _Row):
        """The prompt's figures, once (with the row's first event): (None, ()) for its first token, then each
        token's; None where none were asked or the prompt was not fully scored (a request cancelled midway)."""
        scores, row.prompt_scores = row.prompt_scores, None
        if scores is None or len(scores) != len(row.seq.prompt) - 1:
            return None
        return ((None, ()), *scores)

    def _held(self, i: int) -> list[int]:
        """The tokens whose K/V row i holds at positions 0, 1, ..."""
        row = self.rows[i]
        if row.staged:  # its prompt is on the staging row
            return []
        if row.prefilling:
            return row.seq.prompt[:row.done]
        return (row.seq.prompt + row.seq.tokens)[:row.pos]

    def _free(self, i: int) -> None:
        """Row i's request ends: the row is free, and keeps the K/V of the tokens it holds for a later prompt."""
        self.reuse.released(i, self._held(i))
        self.rows[i] = None

    def _done(self, h: Handle, reason: str) -> None:
        with self.metrics.lock:
            self.metrics.requests_finished += 1
            self.metrics.running_rows = sum(r is not None for r in self.rows)
        h.finish_reason = reason
        self._handles.pop(h.id, None)
        h.done.set()

    def _finish(self, h: Handle, reason: str) -> bool:
        """End a request that never got a row (caller holds the lock)."""
        if h.on_event is not None:
            h.on_event(TokenEvent(h.id, -1, "", reason))
        h.finish_reason = reason
        self._handles.pop(h.id, None)
        with self.metrics.lock:
            self.metrics.requests_finished += 1
        h.done.set()
        return True
