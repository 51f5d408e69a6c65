"""Write a deterministic random GPT-OSS checkpoint directory (config, weights, tokenizer, chat template).

CLI::

    python -m gptoss.tools.make_checkpoint --preset tiny|bench|20b --out DIR [--layout mxfp4|bf16|fp32] [--seed N]
        [--shards N] [--yarn-truncate]

Python::

    make_checkpoint(out_dir, "tiny" | "bench" | "20b" | {config overrides}, layout="mxfp4", seed=0,
                    num_shards=None) -> Path

A dict of overrides is merged over the ``tiny`` preset (over another with ``"preset": "bench"`` or ``"20b"``);
``rope_parameters`` overrides are merged key by key.  ``layer_types`` follows ``num_hidden_layers`` (alternating
``sliding_attention``/``full_attention``, sliding first) unless given.  Token ids (bos/eos/pad) come from the
tokenizer and cannot be overridden.

Presets (every field written to config.json besides the fixed ones listed below):

========================== ================= ==================
field                      tiny              bench
========================== ================= ==================
vocab_size                 1024              16384
hidden_size                64                768
intermediate_size          64                768
num_hidden_layers          4                 4
num_attention_heads        4                 16
num_key_value_heads        2                 2
head_dim                   16                64
num_local_experts          8                 32
num_experts_per_tok        2                 4
sliding_window             8                 128
max_position_embeddings    4096              131072
rope_parameters            yarn, theta 150000, factor 32, beta_fast 32, beta_slow 1, truncate False;
                           original_max_position_embeddings 128 (tiny) / 4096 (bench)
========================== ================= ==================

``20b`` is openai/gpt-oss-20b's config.json as published: 24 layers, hidden 2880, 64 q / 8 kv heads of 64, 32
experts top-4, intermediate 2880, vocab 201088, window 128 (layer types alternating, sliding first), YaRN as
``bench`` with original context 4096, 131072 positions; 20.9B parameters, ~12.8 GiB on disk in the mxfp4 layout.
It (and overrides based on it) is written in the *published style*: config.json has exactly the keys of the
release (``rope_theta`` + ``rope_scaling`` instead of ``rope_parameters``; ``experts_per_token``,
``initial_context_length``; no ``bos_token_id``, ``dtype`` or ``swiglu_alpha``), the harmony block sits at
o200k_harmony's ids (``<|startoftext|>`` 199998, eos ``<|return|>`` 200002, pad 199999), and weights go to 3 shards
plus ``model.safetensors.index.json`` (names ``model-0000k-of-00003``, not the release's file names).
``--yarn-truncate`` writes ``truncate: true`` (llama.cpp always rounds YaRN's correction range: token-for-token
comparisons with it need this; the published value is false).

Fixed for all: rms_norm_eps 1e-5, swiglu_alpha 1.702, swiglu_limit 7.0, attention_bias True,
tie_word_embeddings False, hidden_act "silu", initializer_range 0.02, attention_dropout 0.0,
router_aux_loss_coef 0.9, output_router_logits False, use_cache True.  ``bench`` has gpt-oss-20b's proportions
(32 experts top-4, GQA 8:1, head_dim 64, window 128, the same YaRN) at ~1.04 GB in fp32 (259M parameters).

Layouts:

* ``mxfp4`` (default, as published): expert weights as ``*_blocks`` (uint8 ``[E, out, in/32, 16]``) and
  ``*_scales`` (uint8 ``[E, out, in/32]``) of the ``[E, out, in]`` (transposed) weight, i.e.
  ``gate_up_proj_blocks [E, 2I, H/32, 16]`` and ``down_proj_blocks [E, H, I/32, 16]``; everything else bf16;
  ``config.json`` has ``quantization_config`` (``quant_method: mxfp4``).
* ``bf16`` / ``fp32``: transformers' ``save_pretrained`` names and shapes (``gate_up_proj [E, H, 2I]``,
  ``down_proj [E, I, H]``), every tensor in that dtype.

Weights: every tensor is drawn from its own PCG64 stream (numpy), seeded from ``(seed, tensor name)``, and made
with integer operations and single IEEE-rounded float operations only, so files are byte-identical for a seed
whatever the sharding, the process and the CPU (``torch.randn`` is avoided: its last bit depends on the CPU's SIMD
level).  Values are Irwin-Hall(4) "normals" (sum of four uniforms; mean 0, the given std, bounded at 3.46 std).
**All layouts of one seed hold the same model**: non-expert tensors (and expert biases) are rounded to bf16, and
expert weights are ``dequantize(quantize(w))`` (exactly representable in MXFP4, bf16 and fp32; needs hidden and
intermediate sizes multiples of 32, otherwise they are only bf16-rounded).  Std: embeddings 1; q/k/v/router weights
1/sqrt(H); gate_up 2/sqrt(H) (so the SwiGLU clamp at 7 is sometimes hit); o_proj 1/sqrt(heads*head_dim); down_proj
0.5/sqrt(I); lm_head 1/sqrt(H); biases 0.1; sinks 1; norm weights 1 + 0.1 noise.  The residual stream's RMS stays
within ~1-2.5 over the layers and greedy text is varied.  Generation runs single-threaded in torch (restored
afterwards): it is as fast as two threads on an idle machine and several times faster on a busy one.

Tokenizer: a byte-level BPE (``tokenizers``) trained on a built-in deterministic English-like corpus, followed by the
(published style: reserved fillers up to ``vocab_size - 1090``, then the) harmony special tokens at the offsets the real o200k_harmony vocabulary uses relative to ``<|startoftext|>``
(``<|startoftext|>`` +0, ``<|endoftext|>`` +1, ``<|return|>`` +4, ``<|constrain|>`` +5, ``<|channel|>`` +7,
``<|start|>`` +8, ``<|end|>`` +9, ``<|message|>`` +10, ``<|call|>`` +14) and ``<|reserved_N|>`` fillers up to
``vocab_size``.  The tokenizer depends only on ``vocab_size`` (not on the seed).  bos = ``<|startoftext|>``,
eos = ``<|return|>`` (generation_config: ``[<|return|>, <|endoftext|>, <|call|>]``), pad = ``<|endoftext|>``.

Safetensors files are streamed (a writer of the safetensors format) in pieces of ~4M values: a piece is drawn by
jumping its tensor's generator ahead (``PCG64.advance``), so the bytes do not depend on the piece size and memory
does not grow with the model (the ``20b`` preset writes its 13 GB with a few hundred MB).  Weights are written
before the tokenizer (whose BPE training dominates the peak for the 200k vocabulary); the CLI prints both peaks.
Existing ``model*.safetensors`` and the index in ``out_dir`` are removed first.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from gptoss.model.mxfp4 import BLOCK_SIZE, dequantize_mxfp4, quantize_mxfp4

__all__ = ["PRESETS", "LAYOUTS", "SPECIAL_TOKENS", "make_checkpoint", "build_config", "build_tokenizer", "main"]

LAYOUTS = ("mxfp4", "bf16", "fp32")

_YARN = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
}

_FIXED = {
    "rms_norm_eps": 1e-5,
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "router_aux_loss_coef": 0.9,
    "output_router_logits": False,
    "use_cache": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "sliding_window": 8,
        "max_position_embeddings": 4096,
        "rope_parameters": {**_YARN, "original_max_position_embeddings": 128},
        **_FIXED,
    },
    "bench": {
        "vocab_size": 16384,
        "hidden_size": 768,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "sliding_window": 128,
        "max_position_embeddings": 131072,
        "rope_parameters": {**_YARN, "original_max_position_embeddings": 4096},
        **_FIXED,
    },
    # openai/gpt-oss-20b as published (config.json of the release); written in the published style, see below.
    "20b": {
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "sliding_window": 128,
        "max_position_embeddings": 131072,
        "rope_parameters": {**_YARN, "original_max_position_embeddings": 4096},
        **_FIXED,
    },
}

# Presets (and overrides based on them) written like the published files: config.json in the release's style
# (`rope_theta` + `rope_scaling`, `experts_per_token`, `initial_context_length`; no bos id, dtype or swiglu_alpha),
# the harmony block at the same distance from the vocabulary's end as in o200k_harmony (<|startoftext|> = 199998 of
# 201088), and 3 shards by default.
_PUBLISHED_STYLE = {"20b"}
_O200K_TAIL = 201088 - 199998  # ids from <|startoftext|> to the end of o200k_harmony (harmony block + reserved)
_DEFAULT_SHARDS = {"20b": 3}

_CONFIG_KEYS = set(PRESETS["tiny"]) | {"layer_types"}

# Harmony specials at their offsets from <|startoftext|> in o200k_harmony; the other offsets are reserved.
SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 0,
    "<|endoftext|>": 1,
    "<|return|>": 4,
    "<|constrain|>": 5,
    "<|channel|>": 7,
    "<|start|>": 8,
    "<|end|>": 9,
    "<|message|>": 10,
    "<|call|>": 14,
}
_SPECIAL_BLOCK = 16  # slots after the BPE vocabulary that the harmony block occupies (incl. reserved ones)
_MIN_VOCAB = 256 + _SPECIAL_BLOCK + 16

CHAT_TEMPLATE = (
    "{#- Harmony-style chat template of the random GPT-OSS test checkpoints (simplified: no default system "
    "message). -#}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "{%- if message.get('thinking') -%}"
    "<|start|>assistant<|channel|>analysis<|message|>{{ message['thinking'] }}<|end|>"
    "{%- endif -%}\n"
    "<|start|>assistant<|channel|>final<|message|>{{ message['content'] }}<|end|>\n"
    "{%- else -%}\n"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}\n"
)


# --------------------------------------------------------------------------------------------------- config


def _base_preset(preset_or_overrides: str | dict[str, Any]) -> str:
    if isinstance(preset_or_overrides, str):
        return preset_or_overrides
    return preset_or_overrides.get("preset", "tiny")


def _tokenizer_tail(preset_or_overrides: str | dict[str, Any]) -> int:
    """Ids from <|startoftext|> to the end of the vocabulary."""
    return _O200K_TAIL if _base_preset(preset_or_overrides) in _PUBLISHED_STYLE else _SPECIAL_BLOCK


def _resolve(preset_or_overrides: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(preset_or_overrides, str):
        if preset_or_overrides not in PRESETS:
            raise ValueError(f"unknown preset {preset_or_overrides!r}; choose from {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[preset_or_overrides])
    overrides = dict(preset_or_overrides)
    base = overrides.pop("preset", "tiny")
    if base not in PRESETS:
        raise ValueError(f"unknown preset {base!r}; choose from {sorted(PRESETS)}")
    unknown = set(overrides) - _CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown config overrides {sorted(unknown)}; allowed: {sorted(_CONFIG_KEYS)}")
    cfg = copy.deepcopy(PRESETS[base])
    for key, value in overrides.items():
        if key == "rope_parameters":
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = copy.deepcopy(value)
    return cfg


def _validate(cfg: dict[str, Any], layout: str, tail: int) -> None:
    min_vocab = _MIN_VOCAB - _SPECIAL_BLOCK + tail
    if cfg["vocab_size"] < min_vocab:
        raise ValueError(f"vocab_size must be >= {min_vocab} (256 bytes + harmony block), got {cfg['vocab_size']}")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if not 1 <= cfg["num_experts_per_tok"] <= cfg["num_local_experts"]:
        raise ValueError("need 1 <= num_experts_per_tok <= num_local_experts")
    if len(cfg["layer_types"]) != cfg["num_hidden_layers"]:
        raise ValueError("layer_types must have num_hidden_layers entries")
    if layout == "mxfp4" and (cfg["hidden_size"] % BLOCK_SIZE or cfg["intermediate_size"] % BLOCK_SIZE):
        raise ValueError(
            f"the mxfp4 layout needs hidden_size and intermediate_size multiples of {BLOCK_SIZE}, got "
            f"{cfg['hidden_size']} and {cfg['intermediate_size']}"
        )


def build_config(
    preset_or_overrides: str | dict[str, Any], layout: str, token_ids: dict[str, int]
) -> dict[str, Any]:
    """config.json contents (GptOssConfig.to_dict() style) for a preset or overrides, a layout and token ids."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    cfg = _resolve(preset_or_overrides)
    if "layer_types" not in cfg:
        cfg["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"])
        ]
    _validate(cfg, layout, _tokenizer_tail(preset_or_overrides))
    out: dict[str, Any] = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"}
    out.update(cfg)
    out["dtype"] = "float32" if layout == "fp32" else "bfloat16"
    out["bos_token_id"] = token_ids["<|startoftext|>"]
    out["eos_token_id"] = token_ids["<|return|>"]
    out["pad_token_id"] = token_ids["<|endoftext|>"]
    if layout == "mxfp4":
        out["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        }
    if _base_preset(preset_or_overrides) in _PUBLISHED_STYLE:
        _to_published_style(out)
    return dict(sorted(out.items()))


def _to_published_style(out: dict[str, Any]) -> None:
    """Rewrite config.json contents in place with the keys of openai/gpt-oss-20b's config.json (transformers 4.55)."""
    rope = out.pop("rope_parameters")
    out["rope_theta"] = rope.pop("rope_theta")
    out["rope_scaling"] = rope
    out["experts_per_token"] = out["num_experts_per_tok"]
    out["initial_context_length"] = rope["original_max_position_embeddings"]
    for key in ("bos_token_id", "dtype", "swiglu_alpha"):
        out.pop(key)


# ------------------------------------------------------------------------------------------------ tokenizer


class _Rng:
    """Corpus randomness from ``random.Random(seed).random()`` only: Python guarantees that stream for a seed
    across versions (the other helpers of ``random`` may change), so the tokenizer never changes."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed).random

    def below(self, n: int) -> int:
        return min(int(self._random() * n), n - 1)

    def unit(self) -> float:
        return self._random()

    def pick(self, seq):
        return seq[self.below(len(seq))]


_ENGLISH = """\
The small model reads a line of text, one token at a time, and guesses what comes next. It has no memory of the
world beyond the numbers in its weights, and those numbers were drawn at random, so its guesses are noise. Still,
the machinery is the same as in a large model: an embedding table turns each token into a vector, a stack of
layers mixes the vectors with attention and with a mixture of experts, and a final projection scores every word
in the vocabulary. A runtime that can serve this toy correctly, quickly and without leaking memory can serve the
real thing. We test it against a reference implementation, token by token and logit by logit, on short prompts
and on long ones, with one request or with many at once. When the numbers agree to the last bit, we know the
kernels, the caches and the scheduler all do what they should. When they do not, the small size of the model
makes the search for the bug quick. Hello, world! How are you today? I am fine, thank you, and you?
Numbers such as 0, 1, 2, 3, 10, 42, 100, 2025 and 3.14159 appear in text too, as do names like Alice and Bob.
"""

_WORDS = (
    "the of and to in is that it for on was with as be by at this are from or have an they which one you were her "
    "all she there would their we him been has when who will more no if out so said what up its about into than "
    "them can only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go came "
    "right used take three model token layer expert attention cache window batch kernel graph memory device tensor "
    "weight scale block value number text word line prompt answer question reason think write read run test check"
).split()

_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch",
           "cl", "dr", "fl", "gr", "pl", "pr", "qu", "sh", "sl", "st", "str", "th", "tr")  # fmt: skip
_NUCLEI = ("a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "io", "oo", "ou")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "ng", "nd", "st", "ck", "x", "th", "rt")


def _corpus(vocab_size: int) -> list[str]:
    """Deterministic English-like training text, sized so BPE can reach ``vocab_size`` merges."""
    rng = _Rng(0x6A09E667)
    n_pseudo = max(512, 2 * vocab_size)
    pseudo = []
    seen = set()
    while len(pseudo) < n_pseudo:
        w = "".join(rng.pick(_ONSETS) + rng.pick(_NUCLEI) + rng.pick(_CODAS) for _ in range(1 + rng.below(3)))
        if w not in seen:
            seen.add(w)
            pseudo.append(w)
    lines = [_ENGLISH] * 4
    n_sentences = max(2000, 3 * vocab_size)
    for _ in range(n_sentences):
        words = []
        for _ in range(4 + rng.below(12)):
            r = rng.unit()
            if r < 0.55:
                # Zipf-like: small indices much more frequent.
                words.append(_WORDS[int(len(_WORDS) * rng.unit() ** 2.5)])
            elif r < 0.95:
                words.append(pseudo[int(len(pseudo) * rng.unit() ** 1.5)])
            else:
                words.append(str(rng.below(10 ** (1 + rng.below(4)))))
        words[0] = words[0].capitalize()
        sep = rng.pick((". ", ". ", ". ", "? ", "! ", ", ", ".\n", ":\n"))
        lines.append(" ".join(words) + sep)
    text = "".join(lines)
    return [text[i : i + 4096] for i in range(0, len(text), 4096)]


def build_tokenizer(vocab_size: int, tail: int = _SPECIAL_BLOCK):
    """A ``tokenizers.Tokenizer`` of exactly ``vocab_size`` tokens: byte-level BPE, then the harmony block and
    reserved tokens; ``<|startoftext|>`` is id ``vocab_size - tail`` (reserved tokens fill any gap the BPE leaves)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    min_vocab = _MIN_VOCAB - _SPECIAL_BLOCK + tail
    if tail < _SPECIAL_BLOCK:
        raise ValueError(f"tail must be >= {_SPECIAL_BLOCK} (the harmony block), got {tail}")
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be >= {min_vocab}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - tail,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(vocab_size - tail), trainer=trainer)
    n_bpe = tok.get_vocab_size()
    start = vocab_size - tail
    by_id = {start + off: name for name, off in SPECIAL_TOKENS.items()}
    extra = []
    for i in range(n_bpe, vocab_size):
        name = by_id.get(i, f"<|reserved_{i}|>")
        extra.append(AddedToken(name, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False))
    tok.add_special_tokens(extra)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    return tok


def _write_tokenizer(out: Path, vocab_size: int, model_max_length: int, tail: int) -> dict[str, int]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja; returns special ids."""
    tok = build_tokenizer(vocab_size, tail)
    tok.save(str(out / "tokenizer.json"))
    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    added = {}
    for i in range(len(tok.get_vocab(with_added_tokens=False)), vocab_size):
        added[str(i)] = {
            "content": tok.id_to_token(i),
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    tok_cfg = {
        "added_tokens_decoder": added,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}, indent=2
        )
        + "\n"
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return ids


# ------------------------------------------------------------------------------------------------- weights


# Irwin-Hall(4) of signed 16-bit uniforms: sum of the four int16 fields of a raw 64-bit draw, + 2 to center it,
# is symmetric in [-131070, 131070] with standard deviation sqrt(4 * (65536**2 - 1) / 12).
_IH4_STD = math.sqrt(4 * (65536**2 - 1) / 12)
_RNG_CHUNK = 1 << 20
# Values made at a time when writing a tensor (16 MB in fp32): the writer's memory does not grow with the model.
_PIECE_VALUES = 1 << 22


def _normal(
    seed: int, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Approximately N(mean, std^2) float32 values (Irwin-Hall of 4 uniforms: bounded at 3.46 std), from a PCG64
    stream seeded by ``(seed, name)``; ``rows=(r0, r1)`` makes only ``tensor[r0:r1]`` (same values as the whole).

    Value ``i`` (in row-major order) comes from raw draw ``i`` of the stream, so a slice starts by jumping the
    generator ahead (``PCG64.advance``, O(log n)): a tensor is made a piece at a time with the bytes unchanged.
    Only integer operations and single IEEE-rounded float ops are used, so the values are the same on every CPU.
    (``torch.randn`` is not: its result changes in the last bit with the SIMD capability of the CPU.)
    """
    r0, r1 = rows if rows is not None else (0, shape[0])
    row_numel = math.prod(shape[1:])
    digest = hashlib.sha256(f"gpt-oss-random-checkpoint/{seed}/{name}".encode()).digest()
    bits = np.random.PCG64(int.from_bytes(digest[:16], "little"))
    if r0:
        bits.advance(r0 * row_numel)
    out = torch.empty((r1 - r0, *shape[1:]), dtype=torch.float32)
    flat = out.numpy().reshape(-1)
    scale = np.float32(std / _IH4_STD)
    for i in range(0, flat.size, _RNG_CHUNK):
        n = min(_RNG_CHUNK, flat.size - i)
        u = bits.random_raw(n).view(np.int16).reshape(n, 4)
        acc = u[:, 0].astype(np.int32)
        acc += u[:, 1]
        acc += u[:, 2]
        acc += u[:, 3]
        acc += 2
        np.multiply(acc, scale, out=flat[i : i + n], dtype=np.float32)  # |acc| < 2**24: exact int -> float
    if mean != 0.0:
        out.add_(mean)
    return out


def _row_ranges(n_rows: int, row_numel: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ~_PIECE_VALUES values each (at least one row)."""
    step = max(1, _PIECE_VALUES // max(row_numel, 1))
    return [(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


@dataclass
class _Spec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: Callable[[], Iterator[torch.Tensor]]  # consecutive slices (row-major) whose bytes make the tensor

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _plan(cfg: dict[str, Any], layout: str, seed: int) -> list[_Spec]:
    """Every tensor of the checkpoint, in file order, with a function that makes it."""
    V, H, I = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    E, nh, nkv, hd = cfg["num_local_experts"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    dense = torch.float32 if layout == "fp32" else torch.bfloat16
    quantizable = H % BLOCK_SIZE == 0 and I % BLOCK_SIZE == 0
    specs: list[_Spec] = []

    def add(name, shape, std, mean=0.0):
        # Non-expert tensors and expert biases: bf16-rounded values, stored in the layout's dense dtype.
        shape = tuple(shape)

        def pieces():
            for rows in _row_ranges(shape[0], math.prod(shape[1:])):
                yield _normal(seed, name, shape, std, mean, rows).to(torch.bfloat16).to(dense)

        specs.append(_Spec(name, shape, dense, pieces))

    def add_experts(prefix, proj, out_f, in_f, std):
        # The master weight is drawn in the published orientation [E, out, in] and quantised along `in`, so any
        # range of its E * out rows quantises on its own.
        name = f"{prefix}.{proj}"
        master = (E * out_f, in_f)
        g = in_f // BLOCK_SIZE

        def quantized_pieces():
            for rows in _row_ranges(*master):
                yield quantize_mxfp4(_normal(seed, name, master, std, 0.0, rows))

        if layout == "mxfp4":
            scales_of: list[torch.Tensor] = []  # kept from the blocks pass (1/16 of their size)

            def blocks_pieces():
                scales_of.clear()
                for blocks, scales in quantized_pieces():
                    scales_of.append(scales)
                    yield blocks

            def scales_pieces():
                if sum(s.shape[0] for s in scales_of) == master[0]:
                    yield from scales_of
                else:  # written without its blocks first: quantise again
                    yield from (scales for _, scales in quantized_pieces())
                scales_of.clear()

            specs.append(_Spec(name + "_blocks", (E, out_f, g, BLOCK_SIZE // 2), torch.uint8, blocks_pieces))
            specs.append(_Spec(name + "_scales", (E, out_f, g), torch.uint8, scales_pieces))
        else:

            def pieces():
                # transformers' [E, in, out]: one expert at a time (the transpose needs the whole expert).
                for e in range(E):
                    rows = (e * out_f, (e + 1) * out_f)
                    w = _normal(seed, name, master, std, 0.0, rows)
                    w = dequantize_mxfp4(*quantize_mxfp4(w)) if quantizable else w.to(torch.bfloat16)
                    yield w.t().to(dense).contiguous().unsqueeze(0)

            specs.append(_Spec(name, (E, in_f, out_f), dense, pieces))

    add("model.embed_tokens.weight", (V, H), 1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        add(f"{p}.input_layernorm.weight", (H,), 0.1, 1.0)
        for proj, out_f in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            add(f"{p}.self_attn.{proj}.weight", (out_f, H), H**-0.5)
            add(f"{p}.self_attn.{proj}.bias", (out_f,), 0.1)
        add(f"{p}.self_attn.o_proj.weight", (H, nh * hd), (nh * hd) ** -0.5)
        add(f"{p}.self_attn.o_proj.bias", (H,), 0.1)
        add(f"{p}.self_attn.sinks", (nh,), 1.0)
        add(f"{p}.post_attention_layernorm.weight", (H,), 0.1, 1.0)
        add(f"{p}.mlp.router.weight", (E, H), H**-0.5)
        add(f"{p}.mlp.router.bias", (E,), 0.1)
        add_experts(f"{p}.mlp.experts", "gate_up_proj", 2 * I, H, 2.0 * H**-0.5)
        add(f"{p}.mlp.experts.gate_up_proj_bias", (E, 2 * I), 0.1)
        add_experts(f"{p}.mlp.experts", "down_proj", H, I, 0.5 * I**-0.5)
        add(f"{p}.mlp.experts.down_proj_bias", (E, H), 0.1)
    add("model.norm.weight", (H,), 0.1, 1.0)
    add("lm_head.weight", (V, H), H**-0.5)
    return specs


# ------------------------------------------------------------------------------------------- safetensors I/O

_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.uint8: "U8"}


def _write_safetensors(path: Path, specs: list[_Spec]) -> int:
    """Stream ``specs`` into one safetensors file, making each tensor only when it is written. Returns data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _ST_DTYPE[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        assert sys.byteorder == "little"
        for s in specs:
            written = 0
            for t in s.pieces():
                if t.dtype != s.dtype:
                    raise RuntimeError(f"{s.name}: made {t.dtype}, planned {s.dtype}")
                data = t.contiguous().view(torch.uint8).reshape(-1).numpy()
                f.write(memoryview(data))
                written += data.size
                del t, data
            if written != s.nbytes:
                raise RuntimeError(f"{s.name}: made {written} bytes, planned {s.nbytes} ({s.shape} {s.dtype})")
    return offset


def _split(specs: list[_Spec], num_shards: int) -> list[list[_Spec]]:
    """Consecutive groups of roughly equal byte size, none empty."""
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    if num_shards > len(specs):
        raise ValueError(f"num_shards ({num_shards}) exceeds the number of tensors ({len(specs)})")
    total = sum(s.nbytes for s in specs)
    shards: list[list[_Spec]] = [[] for _ in range(num_shards)]
    k, acc = 0, 0
    for i, s in enumerate(specs):
        remaining_tensors = len(specs) - i
        remaining_shards = num_shards - k
        # Move on when this tensor's middle lies past the shard's share of the bytes, or when every later shard
        # needs one of the remaining tensors.
        past_share = acc + s.nbytes / 2 > total * (k + 1) / num_shards
        if shards[k] and k < num_shards - 1 and (past_share or remaining_tensors <= remaining_shards - 1):
            k += 1
        shards[k].append(s)
        acc += s.nbytes
    assert all(shards)
    return shards


# ---------------------------------------------------------------------------------------------------- driver


def make_checkpoint(
    out_dir: str | Path,
    preset_or_config_overrides: str | dict[str, Any] = "tiny",
    layout: str = "mxfp4",
    seed: int = 0,
    num_shards: int | None = None,
) -> Path:
    """Write a random GPT-OSS checkpoint directory and return its path (see the module docstring).

    ``num_shards`` defaults to the preset's (3 for ``20b`` as published, else 1).
    """
    if num_shards is None:
        num_shards = _DEFAULT_SHARDS.get(_base_preset(preset_or_config_overrides), 1)
    # Small elementwise ops on chunks: one torch thread is as fast uncontended and many times faster when other
    # processes share the cores (OpenMP threads then wait on each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _make_checkpoint(Path(out_dir), preset_or_config_overrides, layout, seed, num_shards)
    finally:
        torch.set_num_threads(threads)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


#: Peak RSS (MiB) of this process after the weights and after the tokenizer of the last make_checkpoint call:
#: the weights are written first so that the first figure is the streaming writer's own.
LAST_PEAK_RSS_MIB: dict[str, float] = {}


def _make_checkpoint(
    out: Path, preset_or_config_overrides: str | dict[str, Any], layout: str, seed: int, num_shards: int
) -> Path:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    # Validate the configuration before writing anything (token ids are placeholders: weights do not use them).
    draft = build_config(preset_or_config_overrides, layout, {name: 0 for name in SPECIAL_TOKENS})
    specs = _plan(draft, layout, seed)
    groups = _split(specs, num_shards)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)

    if num_shards == 1:
        _write_safetensors(out / "model.safetensors", specs)
    else:
        weight_map = {}
        total = 0
        for k, group in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
            total += _write_safetensors(out / fname, group)
            weight_map.update({s.name: fname for s in group})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    LAST_PEAK_RSS_MIB["weights"] = _peak_rss_mib()

    tail = _tokenizer_tail(preset_or_config_overrides)
    ids = _write_tokenizer(out, draft["vocab_size"], draft["max_position_embeddings"], tail)
    cfg = build_config(preset_or_config_overrides, layout, ids)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {
        "bos_token_id": ids["<|startoftext|>"],
        "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    LAST_PEAK_RSS_MIB["total"] = _peak_rss_mib()
    return out


def fp32_size_bytes(preset_or_config_overrides: str | dict[str, Any]) -> int:
    """Bytes of the model's parameters in fp32."""
    cfg = build_config(preset_or_config_overrides, "fp32", {name: 0 for name in SPECIAL_TOKENS})
    return sum(s.nbytes for s in _plan(cfg, "fp32", 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gptoss.tools.make_checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", required=True, help="output directory (created; old model*.safetensors removed)")
    ap.add_argument("--layout", choices=LAYOUTS, default="mxfp4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=None, help="safetensors files (default: 3 for 20b, else 1)")
    ap.add_argument(
        "--yarn-truncate",
        action="store_true",
        help="write rope 'truncate: true' (YaRN correction range rounded, as llama.cpp always does) instead of the "
        "published false: for token-for-token comparisons with llama.cpp",
    )
    args = ap.parse_args(argv)
    spec: str | dict[str, Any] = args.preset
    if args.yarn_truncate:
        spec = {"preset": args.preset, "rope_parameters": {"truncate": True}}
    t0 = time.perf_counter()
    out = make_checkpoint(args.out, spec, layout=args.layout, seed=args.seed, num_shards=args.shards)
    dt = time.perf_counter() - t0
    on_disk = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    fp32 = fp32_size_bytes(spec)
    shards = len(list(out.glob("model*.safetensors")))
    print(
        f"wrote {out} (preset {args.preset}, layout {args.layout}, seed {args.seed}, shards {shards}"
        f"{', yarn truncate' if args.yarn_truncate else ''}) in {dt:.1f}s: {on_disk / 2**20:.1f} MiB on disk; "
        f"fp32 size {fp32 / 2**20:.1f} MiB ({fp32 // 4 / 1e6:.1f}M parameters); peak RSS "
        f"{LAST_PEAK_RSS_MIB['weights']:.0f} MiB writing weights, {LAST_PEAK_RSS_MIB['total']:.0f} MiB with the "
        f"tokenizer"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
