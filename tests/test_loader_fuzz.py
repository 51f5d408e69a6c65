"""Fuzzing every file the loader reads: random truncations, byte flips and structured edits of a small sharded
checkpoint. Each damaged load must either succeed with the original weights (except the tensor whose bytes were
changed, which may legitimately hold other values) or raise CheckpointError naming the damaged file; never another
exception type, a crash or a hang.

The default run draws 300 seeded cases; the slow run 3000 others."""
from __future__ import annotations

import json
import random
import re
import shutil
import signal
import struct
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from gptoss.model.config import ConfigError
from gptoss.model.loader import load_model
from gptoss.model.safetensors_reader import CheckpointError
from gptoss.runtime.tokenizer import TextTokenizer, stop_token_ids
from gptoss.tools.make_checkpoint import make_checkpoint

CASE_SECONDS = 10  # one load of this checkpoint takes well under 0.5 s: ten seconds means it hangs
JUNK = ["x", "", -1, 0, 2 ** 64, -(2 ** 63), 1.5, float("1e300"), None, True, [], [1, "a"], {}, {"a": 1}]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U64", "Q4", "bf16"]


class Hang(BaseException):
    """Raised by the alarm: a BaseException so that no `except Exception` in the code under test swallows it."""


@contextmanager
def time_limit(seconds: float):
    def on_alarm(*_):
        raise Hang(f"no result after {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Case:
    file: str
    what: str
    data: bytes
    changed_tensors: set[str] = field(default_factory=set)  # tensors whose values may legitimately differ


def load_everything(model_dir: Path):
    """What `Runtime.from_pretrained` and the chat path read: config, weights, tokenizer, stop ids, template."""
    model = load_model(model_dir)
    tokenizer = TextTokenizer(model_dir)
    stop_token_ids(model_dir, model.config.eos_token_ids)
    tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    return {k: v.clone() for k, v in model.state_dict().items()}


def params_of(tensor: str) -> set[str]:
    """Model parameter names a checkpoint tensor can feed (q/k/v are fused; MXFP4 blocks/scales may be kept packed
    or dequantised into the expert weight)."""
    name = tensor.removeprefix("model.")
    name = re.sub(r"self_attn\.[qkv]_proj", "self_attn.qkv_proj", name).replace("mlp.experts.", "mlp.")
    out = {name, name.removesuffix(".weight")}
    return out | {re.sub(r"_(blocks|scales)$", "", n) for n in out}


# -- mutations ---------------------------------------------------------------------------------------------------
def _split_safetensors(data: bytes):
    (size,) = struct.unpack("<Q", data[:8])
    return size, json.loads(data[8:8 + size]), data[8 + size:]


def _join_safetensors(header: dict, body: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def _truncate(rng, name, data) -> Case:
    n = rng.randrange(0, len(data))
    return Case(name, f"truncated to {n} of {len(data)} bytes", data[:n])


def _flip(rng, name, data, pos=None) -> Case:
    pos = rng.randrange(len(data)) if pos is None else pos
    out = bytearray(data)
    out[pos] ^= rng.randrange(1, 256)
    return Case(name, f"byte {pos} flipped {data[pos]:#04x} -> {out[pos]:#04x}", bytes(out))


def _safetensors_flip(rng, name, data) -> Case:
    size, header, _ = _split_safetensors(data)
    region = rng.choice(["prefix", "header", "header", "data", "data"])
    if region == "prefix":
        return _flip(rng, name, data, rng.randrange(8))
    if region == "header":
        return _flip(rng, name, data, 8 + rng.randrange(size))
    pos = 8 + size + rng.randrange(len(data) - 8 - size)
    case = _flip(rng, name, data, pos)
    rel = pos - 8 - size
    case.changed_tensors = {t for t, m in header.items() if t != "__metadata__"
                            and m["data_offsets"][0] <= rel < m["data_offsets"][1]}
    return case


def _header_edit(rng, name, data) -> Case:
    _, header, body = _split_safetensors(data)
    tensors = sorted(t for t in header if t != "__metadata__")
    t = rng.choice(tensors)
    meta = header[t]
    kind = rng.choice(["shape", "shape", "dtype", "dtype", "offsets", "offsets", "offsets", "swap", "rename",
                       "delete", "entry", "metadata", "length", "rewrite"])
    changed, length = set(), None
    if kind == "shape":
        shape = list(meta["shape"])
        op = rng.choice(["bump", "zero", "append1", "drop", "junk"])
        if op == "bump" and shape:
            i = rng.randrange(len(shape))
            shape[i] += rng.choice([-1, 1, 2, 1 << 40])
        elif op == "zero" and shape:
            shape[rng.randrange(len(shape))] = 0
        elif op == "append1":
            shape.append(1)  # same element count: only the expected shape can tell
        elif op == "drop" and shape:
            shape.pop()
        else:
            shape = rng.choice(JUNK + [[rng.choice(JUNK)] + shape])
        meta["shape"] = shape
    elif kind == "dtype":
        meta["dtype"] = rng.choice(DTYPES + JUNK)
        changed = {t}  # a same-size dtype is a valid file whose values read differently
    elif kind == "offsets":
        b, e = meta["data_offsets"]
        op = rng.choice(["shift", "end", "begin", "huge", "negative", "reverse", "junk", "three"])
        k = rng.choice([1, 2, 4, 64, 4096, len(body)])
        meta["data_offsets"] = {"shift": [b + k, e + k], "end": [b, e + rng.choice([-k, k])],
                                "begin": [b + rng.choice([-k, k]), e], "huge": [b, 2 ** 64 + e],
                                "negative": [-k, e], "reverse": [e, b], "junk": rng.choice(JUNK),
                                "three": [b, e, e]}[op]
    elif kind == "swap":  # a valid file with two tensors' bytes exchanged: their values may differ
        u = rng.choice(tensors)
        meta["data_offsets"], header[u]["data_offsets"] = header[u]["data_offsets"], meta["data_offsets"]
        changed = {t, u}
    elif kind == "rename":
        header[rng.choice([t + "x", "model.unknown.weight", rng.choice(tensors), ""])] = header.pop(t)
    elif kind == "delete":
        del header[t]
    elif kind == "entry":
        op = rng.choice(["junk", "drop-key", "extra-key"])
        if op == "junk":
            header[t] = rng.choice(JUNK)
        elif op == "drop-key":
            del meta[rng.choice(["dtype", "shape", "data_offsets"])]
        else:
            meta["extra"] = rng.choice(JUNK)
    elif kind == "metadata":
        header["__metadata__"] = rng.choice(JUNK + [{"format": 5}, {"format": "pt"}])
    elif kind == "length":
        text = len(json.dumps(header).encode())
        length = rng.choice([text - 1, text + 1, text + rng.randrange(1, 1 << 20), 0, 2 ** 63, 2 ** 64 - 1])
    return Case(name, f"header edit '{kind}' of '{t}'", _join_safetensors(header, body, length), changed)


def _json_edit(rng, name, data) -> Case:
    doc = json.loads(data)
    node, path = doc, []
    for _ in range(rng.randrange(1, 4)):  # walk a few levels into dicts and lists
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            break
        key = rng.choice(keys)
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.4:
            path.append(key)
            break
        node, path = node[key], path + [key]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if not path:
        doc = rng.choice(JUNK)
    elif rng.random() < 0.3 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(JUNK)
    return Case(name, f"JSON edit at {path}", json.dumps(doc).encode())


def draw_case(rng: random.Random, files: dict[str, bytes]) -> Case:
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    name = rng.choices(
        [rng.choice(shards), "model.safetensors.index.json", "config.json", "generation_config.json",
         "tokenizer.json", "chat_template.jinja", "tokenizer_config.json"],
        weights=[55, 8, 12, 5, 10, 5, 5])[0]
    data = files[name]
    if name.endswith(".safetensors"):
        mutate = rng.choices([_truncate, _safetensors_flip, _header_edit], weights=[3, 4, 4])[0]
    elif name.endswith(".json"):
        mutate = rng.choices([_truncate, _flip, _json_edit], weights=[1, 1, 1])[0]
    else:
        mutate = rng.choice([_truncate, _flip])
    return mutate(rng, name, data)


# -- the test ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    """A 2-layer tiny checkpoint in two shards (so the index is read too), MXFP4 experts as published."""
    base = make_checkpoint(tmp_path_factory.mktemp("fuzz") / "base", {"num_hidden_layers": 2}, layout="mxfp4",
                           num_shards=2)
    return base, load_everything(base)


def run_cases(base: Path, reference: dict, work: Path, seed: int, count: int):
    shutil.copytree(base, work)
    files = {p.name: p.read_bytes() for p in work.iterdir()}
    rng = random.Random(seed)
    problems, outcomes, slowest = [], Counter(), 0.0
    for i in range(count):
        case = draw_case(rng, files)
        path = work / case.file
        path.write_bytes(case.data)
        start = time.perf_counter()
        try:
            with time_limit(CASE_SECONDS):
                loaded = load_everything(work)
        except (CheckpointError, ConfigError) as e:  # (ConfigError is a CheckpointError; the old code's was not)
            outcomes["refused"] += 1
            if case.file not in str(e):
                problems.append((i, case, "message does not name the file", f"{type(e).__name__}: {e}"))
        except Hang as e:
            problems.append((i, case, "hang", str(e)))
        except Exception as e:  # noqa: BLE001 - the point of the test: which raw exceptions escape
            problems.append((i, case, "raw exception", f"{type(e).__name__}: {e}"))
        else:
            allowed = set().union(*(params_of(t) for t in case.changed_tensors)) if case.changed_tensors else set()
            differing = sorted(k for k in reference if k not in loaded or not torch.equal(reference[k], loaded[k]))
            wrong = [k for k in differing if k not in allowed]
            outcomes["loaded"] += 1
            if wrong or set(loaded) != set(reference):
                problems.append((i, case, "loaded different weights", ", ".join(wrong[:3])))
        finally:
            slowest = max(slowest, time.perf_counter() - start)
            path.write_bytes(files[case.file])
    return problems, outcomes, slowest


def _report(problems, outcomes, slowest, count) -> str:
    kinds = Counter(p[2] if p[2] != "raw exception" else p[3].split(":")[0] for p in problems)
    lines = [f"{count} cases: {dict(outcomes)}, slowest {slowest:.2f} s; problems by kind: {dict(kinds)}"]
    lines += [f"  case {i}: {c.file}, {c.what}: {kind}: {msg[:200]}" for i, c, kind, msg in problems[:1000]]
    return "\n".join(lines)


@pytest.mark.parametrize("seed, count", [(0, 300), pytest.param(1, 3000, marks=pytest.mark.slow)])
def test_damaged_checkpoints_load_identically_or_raise_naming_the_file(fuzz_base, tmp_path, seed, count):
    base, reference = fuzz_base
    problems, outcomes, slowest = run_cases(base, reference, tmp_path / "work", seed, count)
    print(_report(problems, outcomes, slowest, count))
    assert not problems, _report(problems, outcomes, slowest, count)
    assert outcomes["refused"] > count // 3  # the draws did damage most files
