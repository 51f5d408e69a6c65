"""`Runtime`: owns the static KV cache and the model's two entry points, turns prompts into batches of static
shape, samples, stops and streams.

    rt = Runtime.from_pretrained("checkpoints/tiny", max_batch_size=4, max_seq_len=512)
    for r in rt.generate(["Hello", "The sea"], max_new_tokens=32):
        print(r.text, r.finish_reason)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from gptoss.graph import build_graphs
from gptoss.model.config import GptOssConfig
from gptoss.model.kv_cache import KVCache
from gptoss.model.loader import load_model
from gptoss.model.parallel import Parallel, ShardPlan

from .distributed import env_world, rank_artifact_dir, setup as setup_distributed
from .sampling import sample, validate_sampling
from .shapes import ShapePlan
from .tokenizer import IncrementalDetokenizer, TextTokenizer, stop_token_ids

# Op tables whose attention reads the cache as fixed-size pages need the slot count to be a multiple of a page.
PAGE_SLOTS = {"npu": 128}
# The op table each graph backend runs: torchair's GE graphs need the fused torch_npu ops.
BACKEND_OPS = {"torchair": "npu"}


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only (a stop token that ended generation is included)
    text: str  # their text, without the stop token or stop string
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    prompt_tokens: int = 0


@dataclass
class TokenEvent:
    """One streamed token of prompt `index`; `finish_reason` is set on that prompt's last event."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None = None


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


class Runtime:
    def __init__(self, model, model_dir: str | Path | None = None, *, max_batch_size: int = 8,
                 max_seq_len: int = 4096, prefill_chunk: int = 256, backend: str = "eager",
                 batch_sizes: Sequence[int] | None = None, artifacts: str | Path | None = None,
                 rebuild: bool = False, compile_missing: bool = True, progress: bool = True,
                 min_prefill_chunk: int = 16):
        self.model = model
        self.config = model.config
        self.device = model.device
        self.dtype = model.dtype
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        chunk = min(prefill_chunk, 1 << (max_seq_len - 1).bit_length())
        self.shapes = ShapePlan(max_batch_size, max_seq_len, chunk, min_chunk=min(min_prefill_chunk, chunk),
                                batch_buckets=tuple(batch_sizes) if batch_sizes else None,
                                slot_multiple=PAGE_SLOTS.get(model.ops_name, 1))
        self.cache = KVCache.allocate(self.config, model.plan, max_batch_size, self.shapes.slots, self.dtype,
                                      self.device)
        self.backend = backend
        self.graphs = build_graphs(model, self.shapes, backend, self.cache.keys, self.cache.values,
                                   artifacts=artifacts, rebuild=rebuild, compile_missing=compile_missing,
                                   progress=progress)
        self.tokenizer = TextTokenizer(model_dir)  # without a model_dir: token-id prompts only
        self.eos_ids = stop_token_ids(model_dir, self.config.eos_token_ids) if model_dir else set(
            self.config.eos_token_ids)
        self.last_stats = GenerationStats()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, backend: str = "eager", max_batch_size: int = 8,
                        max_seq_len: int = 4096, prefill_chunk: int = 256, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, batch_sizes: Sequence[int] | None = None,
                        artifacts: str | Path | None = None, rebuild: bool = False,
                        compile_missing: bool = True, progress: bool = True,
                        min_prefill_chunk: int = 16, tp_size: int | None = None,
                        dist_timeout_s: float | None = None, weights: str | None = None) -> "Runtime":
        """Load a checkpoint directory and build (or load from `artifacts`) the graphs for `backend`:
        "eager", "inductor" (CPU/CUDA) or "torchair" (Ascend).

        Tensor parallelism: run one process per rank under `torchrun --nproc-per-node N`; `tp_size` defaults to
        WORLD_SIZE (1 outside torchrun) and must equal it. Each rank joins the process group (gloo on CPU, nccl on
        CUDA, hccl on NPU; collectives time out after `dist_timeout_s`, default 300 s), loads only its shard,
        and builds its own graphs (artifacts under `<artifacts>/tp<N>-rank<r>`). Every rank must then call
        `generate` with the same arguments: the ranks replay the same graphs in lockstep, rank 0's sampled tokens
        are broadcast after every step, and every rank returns the same results (use rank 0's).

        `weights`: "dense" (every weight in `dtype`) or "published" (MXFP4 experts packed, matrices in their stored
        dtype; CPU kernels); default gptoss.model.loader.DEFAULT_WEIGHTS."""
        config = GptOssConfig.from_pretrained(model_dir)
        ShardPlan.build(config, Parallel(tp_size or env_world()[0], 0))  # a tp that cannot split the model: fail
        if backend == "torchair":  # HCCL reads its environment when the communicator is made: set it first
            from gptoss.graph.torchair import configure_launch_env
            configure_launch_env()
        ctx = setup_distributed(tp_size, device, dist_timeout_s)  # before any process group is made
        device = ctx.device
        if dtype is None:  # CPUs without bf16 matrix units run fp32 far faster; accelerators run bf16
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        model = load_model(model_dir, tp_size=ctx.world_size, rank=ctx.rank, dtype=dtype, device=device,
                           ops=BACKEND_OPS.get(backend, "torch"), weights=weights)
        model.parallel.check_group()
        if artifacts is not None:
            artifacts = rank_artifact_dir(artifacts, ctx.world_size, ctx.rank)
        return cls(model, model_dir, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                   prefill_chunk=prefill_chunk, backend=backend, batch_sizes=batch_sizes, artifacts=artifacts,
                   rebuild=rebuild, compile_missing=compile_missing, progress=progress and ctx.is_main,
                   min_prefill_chunk=min_prefill_chunk)

    @property
    def is_main_process(self) -> bool:
        """Rank 0 under tensor parallelism (the one that prints); always True on one device."""
        return self.model.parallel.rank == 0

    # -- the two entry points, on the runtime's cache --------------------------------------------------------
    def _cache_rows(self, rows: int):
        if rows == self.cache.max_batch_size:
            return self.cache.keys, self.cache.values
        return [k[:rows] for k in self.cache.keys], [v[:rows] for v in self.cache.values]

    def _prefill(self, ids, start, last, kv_len: int) -> torch.Tensor:
        return self.graphs.prefill(ids, start, last, *self._cache_rows(ids.shape[0]), kv_len)

    def _decode(self, ids, pos, kv_len: int) -> torch.Tensor:
        return self.graphs.decode(ids, pos, *self._cache_rows(ids.shape[0]), kv_len)

    # -- public API ------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]] | str, *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: Sequence[str | int] | str | int | None = None,
                 stream: bool = False, ignore_eos: bool = False):
        """Generate for each prompt (strings, or lists of token ids; lengths may differ). Returns a list of
        `GenerationResult` in prompt order, or with `stream=True` an iterator of `TokenEvent`s. `ignore_eos` keeps
        generating past the checkpoint's EOS tokens (benchmarks). Bad input raises ValueError/TypeError before
        anything runs; the runtime stays usable."""
        encoded = self._encode_prompts(prompts)
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        validate_sampling(temperature, top_k, top_p)
        stop_ids, stop_strings = self._parse_stop(stop)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        seqs = [_Sequence(i, p, min(max_new_tokens, self.shapes.max_seq_len - len(p)),
                          IncrementalDetokenizer(self.tokenizer)) for i, p in enumerate(encoded)]
        stop_ids = stop_ids if ignore_eos else stop_ids | self.eos_ids
        events = self._run(seqs, temperature, top_k, top_p, generator, stop_ids, stop_strings)
        if stream:
            return events
        for _ in events:
            pass
        return [GenerationResult(list(s.tokens), s.detok.text[:s.stop_at], s.finish_reason, len(s.prompt))
                for s in seqs]

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
        if stop is None:
            return set(), []
        if isinstance(stop, (str, int)):
            stop = [stop]
        ids, strings = set(), []
        for s in stop:
            if isinstance(s, bool) or not isinstance(s, (str, int)):
                raise TypeError(f"stop entries must be strings or token ids, got {s!r}")
            if isinstance(s, int):
                if not 0 <= s < self.config.vocab_size:
                    raise ValueError(f"stop token id {s} is outside the vocabulary [0, {self.config.vocab_size})")
                ids.add(s)
            elif not s:
                raise ValueError("stop strings must be non-empty")
            elif not self.tokenizer.available:
                raise ValueError("stop strings need the checkpoint's tokenizer.json; pass stop token ids instead")
            else:
                strings.append(s)
        return ids, strings

    # -- the loop --------------------------------------------------------------------------------------------
    def _run(self, seqs: list[_Sequence], temperature, top_k, top_p, generator, stop_ids, stop_strings
             ) -> Iterator[TokenEvent]:
        stats = self.last_stats = GenerationStats()
        limit = self.shapes.max_batch_size
        with torch.no_grad():
            for first in range(0, len(seqs), limit):
                stats.batches += 1
                yield from self._run_batch(seqs[first:first + limit], temperature, top_k, top_p, generator,
                                           stop_ids, stop_strings, stats)

    def _run_batch(self, batch: list[_Sequence], temperature, top_k, top_p, generator, stop_ids, stop_strings,
                   stats: GenerationStats) -> Iterator[TokenEvent]:
        n = len(batch)
        rows = n if self.backend == "eager" else self.shapes.batch(n)  # graphs exist for bucketed sizes only
        dev = self.device
        lengths = torch.tensor([len(s.prompt) for s in batch] + [1] * (rows - n), device=dev)
        stats.prompt_tokens += sum(len(s.prompt) for s in batch)

        t0 = time.perf_counter()
        logits = self._prefill_batch([s.prompt for s in batch] + [[0]] * (rows - n), lengths)
        next_tokens = self.model.parallel.broadcast(sample(logits, temperature, top_k, top_p, generator))
        stats.prefill_s += time.perf_counter() - t0

        t0 = time.perf_counter()
        pos = lengths.clone()
        active = torch.zeros(rows, dtype=torch.bool, device=dev)
        active[:n] = True
        while True:
            host_tokens = next_tokens.tolist()
            for row, seq in enumerate(batch):
                if seq.finish_reason is None:
                    event = self._accept(seq, host_tokens[row], stop_ids, stop_strings)
                    stats.generated_tokens += 1
                    if seq.finish_reason is not None:
                        active[row] = False
                    yield event
            if not bool(active.any()):
                break
            kv_len = self.shapes.kv_len(int(pos[active].max()) + 1)
            logits = self._decode(next_tokens, pos, kv_len)
            stats.decode_steps += 1
            next_tokens = self.model.parallel.broadcast(sample(logits, temperature, top_k, top_p, generator))
            pos = pos + active.to(pos.dtype)  # finished rows stay put: their writes land in their own slot
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
            chunk = self.shapes.chunk(done, longest - done)
            start = torch.full((rows,), done, dtype=torch.long, device=self.device)
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
        if token in stop_ids:
            seq.finish_reason = "stop"  # the stop token's own text is not part of the output
        else:
            seq.detok.push(token)
            text = seq.detok.text
            for s in stop_strings:
                hit = text.find(s, max(0, seq.emitted - len(s) + 1))
                if hit >= 0 and (seq.stop_at is None or hit < seq.stop_at):
                    seq.stop_at, seq.finish_reason = hit, "stop"
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
            end = len(text) - _stop_prefix_len(text, stop_strings)
        delta = text[seq.emitted:max(end, seq.emitted)]
        seq.emitted = max(end, seq.emitted)
        return TokenEvent(seq.index, token, delta, seq.finish_reason)


def _stop_prefix_len(text: str, stop_strings: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    longest = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest
