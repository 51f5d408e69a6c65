"""`Runtime`: owns the static KV cache and the model's two entry points, turns prompts into batches of static
shape, samples, stops and streams.

    rt = Runtime.from_pretrained("checkpoints/tiny", max_batch_size=4, max_seq_len=512)
    for r in rt.generate(["Hello", "The sea"], max_new_tokens=32):
        print(r.text, r.finish_reason)
"""
from __future__ import annotations

import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from gptoss.graph import ShapePlan, get_backend
from gptoss.model.config import GptOssConfig
from gptoss.model.host_memory import keep_freed_memory
from gptoss.model.kv_cache import KVCache
from gptoss.model.loader import load_model
from gptoss.model.parallel import Parallel, ShardPlan

from .distributed import env_world, setup as setup_distributed
from .request import TokenEvent
from .sampling import LogitAdjustments, sample, token_logprobs
from .sampling_params import validate_adjustments, validate_logprobs, validate_sampling
from .settings import Settings
from .stop_text import held_back, parse_stop
from .structured import check as check_grammar, grammar as whole_reply
from .token_constraint import TokenConstraint
from .tokenizer import IncrementalDetokenizer, TextTokenizer, stop_token_ids


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only (a stop token that ended generation is included)
    text: str  # their text, without the stop token or stop string
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    prompt_tokens: int = 0
    # with `logprobs`: each token's log-probability, and its alternatives' ((token id, log-probability), most likely
    # first), under the model's own distribution
    logprobs: list[float] | None = None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    batches: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0


@dataclass
class _Sequence:
    index: int
    prompt: list[int]
    budget: int  # max tokens this sequence may generate
    detok: IncrementalDetokenizer
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_at: int | None = None  # text length to cut at, when a stop string matched
    emitted: int = 0  # characters of text already streamed
    adjust: LogitAdjustments | None = None  # its penalties and biases, where it has any (told of each token)
    constraint: TokenConstraint | None = None  # the grammar its reply follows, where it has one


def steer(logits: torch.Tensor, seqs: Sequence["_Sequence | None"]) -> torch.Tensor:
    """logits [rows, V] (row r is seqs[r]'s; None or a finished sequence: left alone) -> the logits each
    sequence's choice is made from: its penalties and biases applied, then its grammar's mask. A copy where
    anything changes: the caller reports log-probabilities from the model's own."""
    steered = [r for r, s in enumerate(seqs) if s is not None and s.finish_reason is None
               and (s.adjust is not None or s.constraint is not None)]
    if not steered:
        return logits
    logits = logits.clone()
    for r in steered:
        seq = seqs[r]
        if seq.adjust is not None:
            logits[r] = seq.adjust(logits[r])
        if seq.constraint is not None:
            seq.constraint.restrict(logits[r])
    return logits


def plan_shapes(config: GptOssConfig, settings: Settings) -> ShapePlan:
    """The static shapes a runtime with these (resolved) settings runs at."""
    chunk = min(settings.prefill_chunk, 1 << (settings.max_seq_len - 1).bit_length())
    window = config.sliding_window if any(config.is_sliding(i) for i in range(config.num_hidden_layers)) else 0
    return ShapePlan(settings.max_batch_size, settings.max_seq_len, chunk,
                     min_chunk=min(settings.min_prefill_chunk, chunk), batch_buckets=settings.batch_sizes,
                     slot_multiple=get_backend(settings.backend).page_slots, window=window,
                     window_cache=settings.window_cache, interleave_chunk=min(settings.interleave_chunk, chunk),
                     mixed=settings.mixed_steps, granule=min(settings.prefill_granule, chunk),
                     kv_buckets=settings.kv_buckets)


def allocate_cache(config: GptOssConfig, plan: ShardPlan, shapes: ShapePlan, dtype: torch.dtype,
                   device: torch.device | str | None = None) -> KVCache:
    """The KV cache a runtime with `shapes` allocates (device="meta" sizes it without allocating)."""
    return KVCache.allocate(config, plan, shapes.max_batch_size, shapes.slots, dtype, device,
                            window_slots=shapes.window_slots, staging=shapes.mixed)


class Runtime:
    """Owns the KV cache and the graphs of one model; `generate` runs prompts through them.

    Safe to call from several threads: calls take turns (each gets exactly what it would get alone). A stream
    holds the runtime until it is exhausted, closed, or dropped; a new call from the thread that holds an
    unfinished stream ends that stream first (iterating it again raises)."""

    def __init__(self, model, model_dir: str | Path | None = None, settings: Settings | None = None, **overrides):
        self.model, self.config = model, model.config
        self.device, self.dtype = model.device, model.dtype
        # the model, already built, decides the device, dtype and weight format
        settings = (settings or Settings()).replace(**overrides, device=str(self.device), dtype=self.dtype,
                                                    weights=model.weights)
        self.settings = settings = settings.resolve(model.parallel.tp_size, model.parallel.rank)
        if settings.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(settings.threads)
        if settings.keep_host_memory and self.device.type == "cpu":
            keep_freed_memory()
        if settings.max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len={settings.max_seq_len} exceeds the model's max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        backend = get_backend(settings.backend)
        self.shapes = plan_shapes(self.config, settings)
        self.cache = allocate_cache(self.config, model.plan, self.shapes, self.dtype, self.device)
        # the checkpoint's text files before the graphs: a bad tokenizer is reported before a long compile
        self.tokenizer = TextTokenizer(model_dir)  # without a model_dir: token-id prompts only
        self.eos_ids = stop_token_ids(model_dir, self.config.eos_token_ids) if model_dir else set(
            self.config.eos_token_ids)
        self.backend = settings.backend
        if self.device.type == "cpu" and (model.weights == "published" or self.dtype == torch.float32):
            # the CPU kernels (published weights' matmuls; fp32 attention in any weight form) are compiled once
            # per machine (130 s on a 2-core Zen 3), here rather than inside the first step: a first prefill's
            # timing is the model's, not the compiler's
            from gptoss.model import kernels
            kernels.extension()
        self.graphs = backend.build(model, self.shapes, self.cache, settings)
        self.last_stats = GenerationStats()
        self._turn = _Turn()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, settings: Settings | None = None, **overrides) -> "Runtime":
        """Load a checkpoint directory and build (or load from `settings.artifacts`) the graphs for the backend.
        `settings` (a `Settings`) and keyword overrides of its fields, e.g. `backend="inductor", max_seq_len=4096`.

        Tensor parallelism: run one process per rank under `torchrun --nproc-per-node N`; `tp_size` defaults to
        WORLD_SIZE (1 outside torchrun) and must equal it. Each rank joins the process group (gloo on CPU, nccl on
        CUDA, hccl on NPU; collectives time out after `dist_timeout_s`, default 300 s), loads only its shard,
        and builds its own graphs (artifacts under `<artifacts>/tp<N>-rank<r>`). Every rank must then call
        `generate` with the same arguments: the ranks replay the same graphs in lockstep, rank 0's sampled tokens
        are broadcast after every step, and every rank returns the same results (use rank 0's)."""
        settings = (settings or Settings()).replace(**overrides)
        config = GptOssConfig.from_pretrained(model_dir)
        world, rank, _ = env_world()
        ShardPlan.build(config, Parallel(settings.tp_size or world, 0))  # a tp that cannot split the model: fail
        settings = settings.resolve(settings.tp_size or world, rank)
        backend = get_backend(settings.backend)
        backend.apply_launch_env()  # e.g. HCCL reads its environment when the communicator is made: set it first
        ctx = setup_distributed(settings.tp_size, settings.device, settings.dist_timeout_s)
        model = load_model(model_dir, tp_size=ctx.world_size, rank=ctx.rank, dtype=settings.torch_dtype,
                           device=ctx.device, ops=backend.ops, ops_mode=backend.ops_mode,
                           weights=settings.weights, mmap=settings.mmap)
        model.parallel.check_group()
        return cls(model, model_dir, settings.replace(progress=settings.progress and ctx.is_main))

    @property
    def is_main_process(self) -> bool:
        """Rank 0 under tensor parallelism (the one that prints); always True on one device."""
        return self.model.parallel.rank == 0

    # -- the two entry points, on the runtime's cache --------------------------------------------------------
    def _prefill(self, ids, start, last, kv_len: int) -> torch.Tensor:
        return self.graphs.prefill(ids, start, last, *self.cache.rows(ids.shape[0]), kv_len)

    def _decode(self, ids, pos, kv_len: int) -> torch.Tensor:
        return self.graphs.decode(ids, pos, *self.cache.rows(ids.shape[0]), kv_len)

    # -- public API ------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]] | str, *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: Sequence[str | int] | str | int | None = None,
                 stream: bool = False, ignore_eos: bool = False, min_p: float | None = None,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                 logit_bias: dict[int, float] | None = None, logprobs: int | None = None,
                 grammar: str | dict | None = None):
        """Generate for each prompt (strings, or lists of token ids; lengths may differ). Returns a list of
        `GenerationResult` in prompt order, or with `stream=True` an iterator of `TokenEvent`s. `ignore_eos` keeps
        generating past the checkpoint's EOS tokens (benchmarks). The penalties and `logit_bias` (token id -> bias)
        are `sampling.LogitAdjustments`' (each prompt's own); `logprobs=K` reports each token's log-probability
        and K alternatives'. `grammar` holds each reply to a grammar (`runtime.structured`: e.g.
        `grammar=structured.json_schema({...})`, or a grammar text built there); a reply ends ("stop") when its
        grammar is complete. Bad input raises ValueError/TypeError before anything runs; the runtime stays
        usable."""
        encoded = self._encode_prompts(prompts)
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        validate_sampling(temperature, top_k, top_p, min_p)
        bias = tuple(sorted((logit_bias or {}).items()))
        validate_adjustments(presence_penalty, frequency_penalty, repetition_penalty, bias, self.config.vocab_size)
        validate_logprobs("logprobs", logprobs)
        if isinstance(grammar, dict):
            grammar = whole_reply(grammar)
        if grammar is not None:
            check_grammar(grammar, self.tokenizer)
        stop_ids, stop_strings = self._parse_stop(stop)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        seqs = [_Sequence(i, p, min(max_new_tokens, self.shapes.max_seq_len - len(p)),
                          IncrementalDetokenizer(self.tokenizer),
                          adjust=LogitAdjustments.of(p, presence=presence_penalty, frequency=frequency_penalty,
                                                     repetition=repetition_penalty, bias=bias, device=self.device),
                          constraint=TokenConstraint(grammar, self.tokenizer) if grammar is not None else None)
                for i, p in enumerate(encoded)]
        stop_ids = stop_ids if ignore_eos else stop_ids | self.eos_ids
        choice = _Choice(temperature, top_k, top_p, min_p, generator, logprobs)
        events = self._run(seqs, choice, stop_ids, stop_strings)
        if stream:
            return _Stream(events, self._turn)
        results = [GenerationResult([], "", "", len(s.prompt), [] if logprobs is not None else None,
                                    [] if logprobs is not None else None) for s in seqs]
        with self._turn.hold():
            for event in events:
                if event.logprob is not None:
                    results[event.index].logprobs.append(event.logprob)
                    results[event.index].top_logprobs.append(event.top_logprobs)
        for r, s in zip(results, seqs):
            r.token_ids, r.text, r.finish_reason = list(s.tokens), s.detok.text[:s.stop_at], s.finish_reason
        return results

    def logits(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> torch.Tensor:
        """Next-token logits (fp32, [len(prompts), vocab]) after each prompt: prefill only, nothing sampled."""
        encoded = self._encode_prompts(prompts)
        out, limit = [], self.shapes.max_batch_size
        with self._turn.hold(), torch.no_grad():
            for first in range(0, len(encoded), limit):
                batch = encoded[first:first + limit]
                rows = self.shapes.batch(len(batch))
                lengths = torch.tensor([len(p) for p in batch] + [1] * (rows - len(batch)), device=self.device)
                out.append(self._prefill_batch(batch + [[0]] * (rows - len(batch)), lengths)[:len(batch)])
        return torch.cat(out)

    # -- validation ------------------------------------------------------------------------------------------
    def _encode_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError("prompts must be a non-empty list of strings or of token-id lists")
        if all(isinstance(p, int) for p in prompts):
            raise TypeError("prompts must be a list of prompts: wrap one token-id prompt as [[id, id, ...]]")
        encoded = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids = list(p)
            elif isinstance(p, torch.Tensor) and p.dim() == 1 and not p.is_floating_point():
                ids = p.tolist()
            else:
                raise TypeError(f"prompt {i} must be a string or a list of int token ids, got {type(p).__name__}")
            if not ids:
                raise ValueError(f"prompt {i} is empty: at least one token is needed")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, "
                                 f"{self.config.vocab_size})")
            if len(ids) >= self.shapes.max_seq_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; max_seq_len={self.shapes.max_seq_len} leaves "
                                 f"no room to generate (prompt must be shorter than max_seq_len)")
            encoded.append(ids)
        return encoded

    def _parse_stop(self, stop) -> tuple[set[int], list[str]]:
        return parse_stop(stop, self.config.vocab_size, self.tokenizer)

    # -- the loop --------------------------------------------------------------------------------------------
    def _run(self, seqs: list[_Sequence], choice: "_Choice", stop_ids, stop_strings) -> Iterator[TokenEvent]:
        stats = self.last_stats = GenerationStats()
        limit = self.shapes.max_batch_size
        with torch.no_grad():
            for first in range(0, len(seqs), limit):
                stats.batches += 1
                yield from self._run_batch(seqs[first:first + limit], choice, stop_ids, stop_strings, stats)

    def _run_batch(self, batch: list[_Sequence], choice: "_Choice", stop_ids, stop_strings,
                   stats: GenerationStats) -> Iterator[TokenEvent]:
        n = len(batch)
        rows = self.shapes.batch(n)  # graphs exist for bucketed sizes only
        dev = self.device
        lengths = torch.tensor([len(s.prompt) for s in batch] + [1] * (rows - n), device=dev)
        stats.prompt_tokens += sum(len(s.prompt) for s in batch)

        t0 = time.perf_counter()
        logits = self._prefill_batch([s.prompt for s in batch] + [[0]] * (rows - n), lengths)
        next_tokens = self.model.parallel.broadcast(choice.pick(logits, batch))
        stats.prefill_s += time.perf_counter() - t0

        t0 = time.perf_counter()
        pos = lengths.clone()
        active = torch.zeros(rows, dtype=torch.bool, device=dev)
        active[:n] = True
        # the same on the host, so deciding the next step's cache length reads no device tensor
        host_pos = [len(s.prompt) for s in batch]
        while True:
            host_tokens = next_tokens.tolist()
            for row, seq in enumerate(batch):
                if seq.finish_reason is None:
                    event = self._accept(seq, host_tokens[row], stop_ids, stop_strings)
                    if choice.logprobs is not None:
                        event.logprob, event.top_logprobs = token_logprobs(logits[row], host_tokens[row],
                                                                           choice.logprobs)
                    stats.generated_tokens += 1
                    if seq.finish_reason is not None:
                        active[row] = False
                    yield event
            live = [p for p, s in zip(host_pos, batch) if s.finish_reason is None]
            if not live:
                break
            kv_len = self.shapes.kv_len(max(live) + 1)
            logits = self._decode(next_tokens, pos, kv_len)
            stats.decode_steps += 1
            next_tokens = self.model.parallel.broadcast(choice.pick(logits, batch))
            pos = pos + active.to(pos.dtype)  # finished rows stay put: their writes land in their own slot
            host_pos = [p + (s.finish_reason is None) for p, s in zip(host_pos, batch)]
        stats.decode_s += time.perf_counter() - t0

    def _prefill_batch(self, prompts: list[list[int]], lengths: torch.Tensor) -> torch.Tensor:
        """Runs the prompts through the model in chunks of static length; returns each row's logits at its last
        prompt token."""
        rows, longest = len(prompts), int(lengths.max())
        padded = torch.zeros(rows, self.shapes.slots, dtype=torch.long)
        for r, p in enumerate(prompts):
            padded[r, :len(p)] = torch.tensor(p)
        padded = padded.to(self.device)
        out = torch.empty(rows, self.config.vocab_size, dtype=torch.float32, device=self.device)
        done = 0
        while done < longest:
            chunk = self.shapes.chunk(done, longest - done, batch=rows)
            # a row whose prompt has ended re-runs at its next position, not further on: a ring cache keeps only
            # the window, and padding written further on would overwrite it (decode overwrites these slots first)
            start = torch.full((rows,), done, dtype=torch.long, device=self.device).minimum(lengths)
            last = (lengths - 1 - done).clamp(0, chunk - 1)
            # a fresh tensor: graphs are specialised to standard strides, which a column slice does not have
            ids = padded[:, done:done + chunk].clone(memory_format=torch.contiguous_format)
            logits = self._prefill(ids, start, last, self.shapes.kv_len(done + chunk))
            ends_here = (lengths - 1 >= done) & (lengths - 1 < done + chunk)
            out[ends_here] = logits[ends_here].float()
            done += chunk
        return out

    def _accept(self, seq: _Sequence, token: int, stop_ids: set[int], stop_strings: list[str]) -> TokenEvent:
        """Take one sampled token: decide whether the sequence ends, and which text becomes visible. Text that
        could be the start of a stop string is held back until it is known not to be one."""
        seq.tokens.append(token)
        if seq.adjust is not None:
            seq.adjust.generated(token)
        # a complete grammar ends the reply: by the end-of-sequence token it allowed, or by its last text
        complete = seq.constraint is not None and seq.constraint.accept(token)
        if token in stop_ids or (complete and seq.constraint.ends_with(token)):
            seq.finish_reason = "stop"  # the stop token's own text is not part of the output
        else:
            seq.detok.push(token)
            text = seq.detok.text
            for s in stop_strings:
                hit = text.find(s, max(0, seq.emitted - len(s) + 1))
                if hit >= 0 and (seq.stop_at is None or hit < seq.stop_at):
                    seq.stop_at, seq.finish_reason = hit, "stop"
            if seq.finish_reason is None and complete:
                seq.finish_reason = "stop"
            if seq.finish_reason is None and len(seq.tokens) >= seq.budget:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.detok.flush()
        text = seq.detok.text
        if seq.stop_at is not None:
            end = seq.stop_at
        elif seq.finish_reason is not None:
            end = len(text)
        else:
            end = len(text) - held_back(text, stop_strings)
        delta = text[seq.emitted:max(end, seq.emitted)]
        seq.emitted = max(end, seq.emitted)
        return TokenEvent(seq.index, token, delta, seq.finish_reason)


@dataclass
class _Choice:
    """How a generate call picks each row's next token: its sequences' adjustments, then its sampling settings."""
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    generator: torch.Generator | None
    logprobs: int | None  # alternatives to report a token (None: no log-probabilities)

    def pick(self, logits: torch.Tensor, batch: list[_Sequence]) -> torch.Tensor:
        """logits [rows, V] (row r is batch[r]'s; rows past the batch are padding) -> tokens [rows]."""
        return sample(steer(logits, batch), self.temperature, self.top_k, self.top_p, self.generator, self.min_p)


class _Turn:
    """Whose turn it is to use the runtime's cache and static buffers: one generation at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        # the stream holding the turn, if one does: a weak reference, so that dropping the stream ends it
        self._stream: weakref.ref | None = None
        self._thread: int | None = None  # the thread that took it

    def acquire(self, stream: "_Stream | None" = None) -> None:
        holder = self._stream() if self._stream is not None else None
        if holder is not None and self._thread == threading.get_ident():
            holder.supersede()  # this thread left its own stream unfinished: waiting for it would never end
        self._lock.acquire()
        self._stream = weakref.ref(stream) if stream is not None else None
        self._thread = threading.get_ident()

    def release(self) -> None:
        self._stream = self._thread = None
        self._lock.release()

    @contextmanager
    def hold(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


class _Stream:
    """A streamed generation: takes the runtime's turn at its first event, gives it back when it ends, is closed,
    raises, or is dropped."""

    def __init__(self, events: Iterator[TokenEvent], turn: _Turn):
        self._events, self._turn = events, turn
        self._holding = self._superseded = False

    def __iter__(self):
        return self

    def __next__(self) -> TokenEvent:
        if self._superseded:
            raise RuntimeError("this stream was left unfinished and a later generate call on the same thread took "
                               "the runtime; its remaining tokens are gone")
        if not self._holding:
            self._turn.acquire(self)
            self._holding = True
        try:
            return next(self._events)
        except BaseException:  # StopIteration included: the generation is over either way
            self._finish()
            raise

    def _finish(self) -> None:
        if self._holding:
            self._holding = False
            self._turn.release()

    def close(self) -> None:
        try:
            self._events.close()
        finally:
            self._finish()

    def supersede(self) -> None:
        self._superseded = True
        self.close()

    def __del__(self):
        self.close()

