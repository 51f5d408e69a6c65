"""The llama.cpp side of :mod:`gptoss.tools.dev.llama_peer`, run by the python of llama.cpp's own virtualenv.

Imports only the standard library, numpy and ``llama_cpp`` (never ``gptoss``): it is executed by path in that
virtualenv, one process per job, so llama.cpp never computes while the runtime does.  Reads a JSON job from argv[1],
prints one JSON object on stdout (llama.cpp's own log goes to stderr).

Jobs (``"job"`` key):

* ``convert``: ``convert_hf_to_gguf.py`` of the llama.cpp source this package was built from, on ``model_dir``, to
  ``outfile`` with ``outtype``.  Its pre-tokenizer check knows tokenizers by the hash of their ids on a fixed text;
  a checkpoint whose ``tokenizer.json`` is a plain byte-level BPE (ByteLevel pre-tokenizer with the GPT-2 regex) is
  mapped to ``"gpt-2"``, the llama.cpp pre-tokenizer with those rules (``llama_peer`` then checks the ids agree).
* ``tokenize``: ids of ``texts`` with the GGUF's vocabulary (no BOS, no special-token parsing).
* ``logits``: fp32 logits of every position of ``ids`` (one sequence), saved to ``out`` (``.npy``); fp32 KV cache
  and no flash attention, so an F32 GGUF computes in fp32 throughout.
* ``bench``: prefill of ``prefill_ids`` (tok/s, best of ``rounds``) and greedy decode at each batch of
  ``decode_prompts`` (tok/s over ``decode_tokens - 1`` steps after the prompt's first token), ``threads`` threads.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path


def _convert(job: dict) -> dict:
    src = Path(job["llama_cpp_dir"])
    sys.path.insert(0, str(src))
    import convert_hf_to_gguf  # noqa: F401  (puts its gguf-py on sys.path)
    from conversion import base

    tok_json = json.loads((Path(job["model_dir"]) / "tokenizer.json").read_text())
    pre = tok_json.get("pre_tokenizer") or {}
    byte_level_bpe = (
        tok_json.get("model", {}).get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )
    original = base.TextModel.get_vocab_base_pre
    mapped = {}

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if not byte_level_bpe:
                raise
            mapped["pre_tokenizer"] = "gpt-2"
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    argv = [
        "convert_hf_to_gguf.py",
        job["model_dir"],
        "--outfile",
        job["outfile"],
        "--outtype",
        job["outtype"],
    ]
    saved, sys.argv = sys.argv, argv
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = saved
    return {"outfile": job["outfile"], "pre_tokenizer_mapped": mapped.get("pre_tokenizer")}


_GGML_TYPE_F32 = 0  # enum ggml_type
_FLASH_ATTN_DISABLED = 0  # enum llama_flash_attn_type (-1 auto, the default)


class _Llama:
    """A model and one context, through llama_cpp's low-level (C API) bindings."""

    def __init__(self, gguf: str, threads: int, n_ctx: int, n_seq: int, n_batch: int, exact: bool = False) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(gguf.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        cp.n_threads = threads
        cp.n_threads_batch = threads
        if exact:  # fp32 KV cache (default f16) and no flash attention (its CPU path rounds K*Q inputs to f16)
            cp.type_k = cp.type_v = _GGML_TYPE_F32
            cp.flash_attn_type = _FLASH_ATTN_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.flash_attn_type = int(cp.flash_attn_type)
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.n_batch = n_batch

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants_logits) entries."""
        if len(tokens) > self.n_batch:
            raise ValueError(f"{len(tokens)} tokens exceed n_batch {self.n_batch}")
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if out else 0
        b.n_tokens = len(tokens)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.L.llama_synchronize(self.ctx)

    def logits(self, i: int):
        import numpy as np

        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.L.llama_token * (len(raw) + 8))()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(buf[:n])

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def _prefill(llm: _Llama, ids: list[int], seq: int = 0, start: int = 0) -> None:
    for c in range(0, len(ids), llm.n_batch):
        chunk = ids[c : c + llm.n_batch]
        last = c + len(chunk) == len(ids)
        llm.decode([(t, start + c + j, seq, last and j == len(chunk) - 1) for j, t in enumerate(chunk)])


def _greedy_decode(llm: _Llama, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """Prompts in one batch, then `steps` greedy steps of one token per sequence; returns (seconds of the steps,
    generated ids)."""
    llm.clear()
    entries, outs = [], []
    for s, p in enumerate(prompts):
        for j, t in enumerate(p):
            entries.append((t, j, s, j == len(p) - 1))
    for c in range(0, len(entries), llm.n_batch):
        llm.decode(entries[c : c + llm.n_batch])
    # Logit rows of the last llama_decode are in batch order: all prompts fit one batch here (checked by caller).
    out_rows = [i for i, e in enumerate(entries) if e[3]]
    gen = [[int(llm.logits(r).argmax())] for r in out_rows]
    pos = [len(p) for p in prompts]
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.decode([(g[-1], pos[s], s, True) for s, g in enumerate(gen)])
        for s, g in enumerate(gen):
            g.append(int(llm.logits(s).argmax()))
            pos[s] += 1
    return time.perf_counter() - t0, gen


def _bench(job: dict) -> dict:
    threads, rounds = job["threads"], job.get("rounds", 3)
    prefill_ids = job["prefill_ids"]
    steps = job["decode_tokens"] - 1
    out: dict = {"threads": threads}
    llm = _Llama(job["gguf"], threads, n_ctx=len(prefill_ids) + 64, n_seq=1, n_batch=len(prefill_ids))
    out["flash_attn_type"] = llm.flash_attn_type
    _prefill(llm, prefill_ids)  # warm-up
    best = float("inf")
    for _ in range(rounds):
        llm.clear()
        t0 = time.perf_counter()
        _prefill(llm, prefill_ids)
        best = min(best, time.perf_counter() - t0)
    out["prefill_tok_s"] = len(prefill_ids) / best
    llm.close()
    for prompts in job["decode_prompts"]:
        n = len(prompts)
        per_seq = max(len(p) for p in prompts) + steps + 16
        n_prompt = sum(len(p) for p in prompts)
        llm = _Llama(job["gguf"], threads, n_ctx=n * per_seq, n_seq=n, n_batch=max(n_prompt, 64))
        _greedy_decode(llm, prompts, 4)  # warm-up
        seconds, gen = _greedy_decode(llm, prompts, steps)
        out[f"decode_b{n}_tok_s"] = steps * n / seconds
        out[f"decode_b{n}_tokens"] = gen
        llm.close()
    return out


def _logits(job: dict) -> dict:
    import numpy as np

    ids = job["ids"]
    llm = _Llama(job["gguf"], job["threads"], n_ctx=len(ids) + 16, n_seq=1, n_batch=len(ids), exact=True)
    llm.decode([(t, j, 0, True) for j, t in enumerate(ids)])
    rows = np.stack([llm.logits(i).copy() for i in range(len(ids))])
    np.save(job["out"], rows.astype(np.float32))
    llm.close()
    return {"out": job["out"], "shape": list(rows.shape)}


def _tokenize(job: dict) -> dict:
    llm = _Llama(job["gguf"], 1, n_ctx=64, n_seq=1, n_batch=64)
    ids = [llm.tokenize(t) for t in job["texts"]]
    llm.close()
    return {"ids": ids}


def main() -> int:
    job = json.loads(sys.argv[1])
    run = {"convert": _convert, "bench": _bench, "logits": _logits, "tokenize": _tokenize}[job["job"]]
    result = run(job)
    if job["job"] != "convert":
        import llama_cpp

        result["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        result["llama_cpp_python"] = llama_cpp.__version__
    print("\n" + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
