"""Load a GPT-OSS checkpoint directory as published (or as written by transformers) into this rank's shards.

Checkpoint names map onto the model as follows (TP slices in brackets, `r` = this rank):
    self_attn.{q,k,v}_proj.{weight,bias}  -> self_attn.qkv_proj   [q heads of r | kv heads of r]
    self_attn.o_proj.weight               -> self_attn.o_proj      [input columns of r's heads]
    self_attn.o_proj.bias, experts.down_proj_bias -> on rank 0 only (they are added once, after the all-reduce)
    self_attn.sinks                       -> [r's heads]
    mlp.experts.gate_up_proj [E, H, 2I]   -> [columns 2*i0 .. 2*(i0+I_r): interleaved gate/up pairs stay together]
    mlp.experts.down_proj    [E, I, H]    -> [rows i0 .. i0+I_r]
    mlp.experts.*_blocks/_scales (MXFP4)  -> stored [E, out, in/32, 16], i.e. transposed; dense weights: decoded
                                             at load; published weights: kept packed (down's input slice as the
                                             whole blocks covering it, codes outside the slice zeroed)
    embed_tokens, lm_head                 -> [vocab rows of r], zero-padded on the last rank

Weight formats (model/weights.py): "dense" casts every weight to the runtime dtype; "published" keeps the matrices
in their stored dtype (bf16 as published, fp32 stays fp32) and MXFP4 experts packed; norms, sinks and biases are
held in the runtime dtype in both.

Tensors stream one at a time (see safetensors_reader), so peak memory is this rank's shard plus one tensor (one
expert, for expert tensors). A rank maps only its own bytes wherever its slice is contiguous on disk: vocab rows,
q/k/v head rows, sinks, each expert's gate_up rows (MXFP4) or down rows (unquantised). Where the split is an
inner dimension (o_proj's input columns; MXFP4 down_proj's packed input dim; unquantised gate_up's columns) the
layer's matrix, or one expert's, is mapped and the slice copied out. With published weights (`mmap`, the
default) the MXFP4 experts and the embedding are not copied at all where the rank's tensor is the file's bytes as
they lie: they are views of the mapped checkpoint, whose pages the page cache holds once for every process and
keeps between runs (`_used_in_place`).
"""
from __future__ import annotations

import torch

from .config import ConfigError, GptOssConfig
from .gpt_oss import GptOss
from .host_memory import to_host
from .mxfp4 import dequantize_mxfp4
from .parallel import Parallel
from .rope import yarn_inv_freq
from .safetensors_reader import CheckpointError, SafetensorsReader
from .weights import WEIGHT_FORMATS, block_span

MXFP4_BLOCK = 32
#: The weight format `load_model` uses when none is given.
DEFAULT_WEIGHTS = "dense"


def _copy(reader: SafetensorsReader, name: str, expected: tuple, dst: torch.Tensor, dim: int | None = None,
          start: int = 0, length: int | None = None) -> None:
    """dst <- the checkpoint tensor, or its slice [start, start + length) along `dim`. A slice along dim 0 maps
    only those rows; a slice along an inner dim maps the whole tensor (used only for o_proj's input columns,
    one layer's attention output matrix) and copies the slice out."""
    rows = (start, start + length) if dim == 0 else None
    with reader.open(name, expected, rows=rows) as src:
        if dim is not None and dim != 0:
            src = src.narrow(dim, start, length)
        dst.copy_(src)


def _copy_experts(reader: SafetensorsReader, name: str, expected: tuple, dst: torch.Tensor, dim: int,
                  start: int, length: int) -> None:
    """dst [E, ...] <- the slice [start, start + length) along `dim` (1 or 2) of an [E, ...] expert tensor, one
    expert at a time. Along dim 1 only this rank's rows of each expert are mapped; along dim 2 (the columns of
    an unquantised gate_up_proj) one expert's matrix is mapped and the slice copied out."""
    for e in range(expected[0]):
        rows = (start, start + length) if dim == 1 else None
        with reader.open(name, expected, index=(e,), rows=rows) as src:
            dst[e].copy_(src if dim == 1 else src.narrow(dim - 1, start, length))


def _copy_mxfp4(reader: SafetensorsReader, prefix: str, out_features: int, in_features: int, dst: torch.Tensor,
                out_start: int, out_len: int, in_start: int, in_len: int) -> None:
    """dst [E, in_len, out_len] <- dequantised, transposed slice of an MXFP4 [E, out, in] weight, one expert at a
    time. A slice of the output dim (gate_up's columns) maps only this rank's rows of blocks and scales. A slice of
    the input dim (down's rows, the packed 32-wide block dim) maps the expert's blocks, decodes only the blocks
    covering [in_start, in_start + in_len) and trims them, so a split inside a block (2880 / 8 = 360 = 11.25
    blocks) is exact."""
    experts = dst.shape[0]
    if in_features % MXFP4_BLOCK:
        raise CheckpointError(f"'{prefix}_blocks': input width {in_features} is not a multiple of {MXFP4_BLOCK}")
    groups = in_features // MXFP4_BLOCK
    first, last = in_start // MXFP4_BLOCK, -(-(in_start + in_len) // MXFP4_BLOCK)
    trim = in_start - first * MXFP4_BLOCK
    rows = (out_start, out_start + out_len)
    for e in range(experts):  # one expert at a time bounds the mapping and the dequantisation temporaries
        with reader.open(prefix + "_blocks", (experts, out_features, groups, 16), index=(e,), rows=rows) as b, \
                reader.open(prefix + "_scales", (experts, out_features, groups), index=(e,), rows=rows) as s:
            w = dequantize_mxfp4(b[:, first:last], s[:, first:last], dtype=torch.float32)
            dst[e].copy_(w[:, trim:trim + in_len].t())  # [out_len, in_len] -> [in_len, out_len]
            del b, s


def _copy_mxfp4_packed(reader: SafetensorsReader, prefix: str, out_features: int, in_features: int,
                       blocks: torch.Tensor, scales: torch.Tensor, out_start: int, out_len: int, in_start: int,
                       in_len: int) -> None:
    """blocks [E, out_len, G', 16] / scales [E, out_len, G'] <- this rank's slice of an MXFP4 [E, out, in] weight,
    kept packed, one expert at a time. An input slice is held as the G' whole blocks covering it, with the codes
    outside it set to zero (code 0 is +0), so a split inside a block stays exact: the kernel sees zero weights
    there and the activation is zero-padded onto the same grid."""
    experts = blocks.shape[0]
    if in_features % MXFP4_BLOCK:
        raise CheckpointError(f"'{prefix}_blocks': input width {in_features} is not a multiple of {MXFP4_BLOCK}")
    groups = in_features // MXFP4_BLOCK
    first, end, before, after = block_span(in_start, in_len)
    keep = torch.zeros((end - first) * MXFP4_BLOCK, dtype=torch.uint8)
    keep[before:before + in_len] = 1
    mask = (keep[0::2] * 0x0F + keep[1::2] * 0xF0).view(end - first, 16)  # low nibble = even value
    rows = (out_start, out_start + out_len)
    for e in range(experts):
        with reader.open(prefix + "_blocks", (experts, out_features, groups, 16), index=(e,), rows=rows) as b, \
                reader.open(prefix + "_scales", (experts, out_features, groups), index=(e,), rows=rows) as s:
            torch.bitwise_and(b[:, first:end], mask, out=blocks[e])
            scales[e].copy_(s[:, first:end])
            del b, s


def _expected_names(config: GptOssConfig, mxfp4: bool) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expert = (["gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"] if mxfp4
              else ["gate_up_proj", "down_proj"]) + ["gate_up_proj_bias", "down_proj_bias"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.sinks",
                  p + "mlp.router.weight", p + "mlp.router.bias"}
        names |= {p + f"self_attn.{n}_proj.{w}" for n in "qkvo" for w in ("weight", "bias")}
        names |= {p + "mlp.experts." + n for n in expert}
    return names


def _is_mxfp4(reader: SafetensorsReader, config: GptOssConfig) -> bool:
    mxfp4 = any(n.endswith("_blocks") for n in reader.names())
    if mxfp4 and config.quant_method != "mxfp4":
        raise CheckpointError("checkpoint has MXFP4 expert tensors (*_blocks/*_scales) but config.json declares no "
                              "quantization_config with quant_method 'mxfp4'")
    return mxfp4


def _keep_stored_dtypes(model: GptOss, reader: SafetensorsReader) -> None:
    """Published weights: re-allocate (on the meta device) each matrix in its checkpoint dtype."""
    def stored(name):
        return reader.check(name, reader.shape(name)).dtype if name in reader else None

    def retype(module, attr, name):
        dtype = stored(name)
        old = getattr(module, attr)
        if dtype is not None and dtype != old.dtype:
            setattr(module, attr, torch.nn.Parameter(torch.empty_like(old, dtype=dtype), requires_grad=False))

    retype(model, "embed_tokens", "model.embed_tokens.weight")
    retype(model, "lm_head", "lm_head.weight")
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        retype(block.self_attn.qkv_proj, "weight", p + "self_attn.q_proj.weight")
        retype(block.self_attn.o_proj, "weight", p + "self_attn.o_proj.weight")
        retype(block.mlp.router, "weight", p + "mlp.router.weight")
        if not block.mlp.packed:
            retype(block.mlp, "gate_up_proj", p + "mlp.experts.gate_up_proj")
            retype(block.mlp, "down_proj", p + "mlp.experts.down_proj")


def load_weights(model: GptOss, model_dir, in_place: dict | None = None) -> None:
    """Fill `model` (already allocated for its rank, but for the parameters named in `in_place`: see
    `_used_in_place`) from the checkpoint in `model_dir`."""
    in_place = in_place or {}
    config, plan, rank = model.config, model.plan, model.parallel.rank
    reader = SafetensorsReader(model_dir)
    hidden, dim, experts = config.hidden_size, config.head_dim, config.num_local_experts
    inter = config.intermediate_size

    mxfp4 = _is_mxfp4(reader, config)
    packed = model.layers[0].mlp.packed if model.layers else False
    if packed and not mxfp4:
        raise CheckpointError("model allocated for packed MXFP4 experts, but the checkpoint has none")
    expected = _expected_names(config, mxfp4)
    missing = sorted(expected - reader.names())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint tensor '{missing[0]}' is missing{more} from {reader.source} "
                              "(config.json describes it)")
    unknown = sorted(reader.names() - expected)
    if unknown:
        raise CheckpointError(f"checkpoint tensor '{unknown[0]}' in {reader.source} is not part of GPT-OSS as "
                              f"config.json describes it ({len(unknown)} unexpected tensor(s); unknown quantisation "
                              "or wrong config?)")

    with torch.no_grad():
        vocab_rows = min(plan.vocab, config.vocab_size - plan.vocab_start)
        for param, name in (("embed_tokens", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
            if param in in_place:  # (mapped after the layers)
                continue
            dst = getattr(model, param)
            dst[vocab_rows:].zero_()  # the last rank's padding rows
            _copy(reader, name, (config.vocab_size, hidden), dst[:vocab_rows], 0, plan.vocab_start, vocab_rows)
        _copy(reader, "model.norm.weight", (hidden,), model.norm)

        q_rows, kv_rows = plan.q_heads * dim, plan.kv_heads * dim
        q_start, kv_start = plan.q_head_start * dim, plan.kv_head_start * dim
        full_q, full_kv = config.num_attention_heads * dim, config.num_key_value_heads * dim
        i_len, i_start = plan.intermediate, plan.intermediate_start
        for i, block in enumerate(model.layers):
            p = f"model.layers.{i}."
            attn, moe = block.self_attn, block.mlp
            _copy(reader, p + "input_layernorm.weight", (hidden,), block.input_layernorm)
            _copy(reader, p + "post_attention_layernorm.weight", (hidden,), block.post_attention_layernorm)
            for kind, shape in (("weight", (hidden,)), ("bias", ())):
                dst = getattr(attn.qkv_proj, kind)
                _copy(reader, p + f"self_attn.q_proj.{kind}", (full_q, *shape), dst[:q_rows], 0, q_start, q_rows)
                _copy(reader, p + f"self_attn.k_proj.{kind}", (full_kv, *shape), dst[q_rows:q_rows + kv_rows],
                      0, kv_start, kv_rows)
                _copy(reader, p + f"self_attn.v_proj.{kind}", (full_kv, *shape), dst[q_rows + kv_rows:],
                      0, kv_start, kv_rows)
            _copy(reader, p + "self_attn.o_proj.weight", (hidden, full_q), attn.o_proj.weight, 1, q_start, q_rows)
            _copy_or_zero(reader, p + "self_attn.o_proj.bias", (hidden,), attn.o_proj.bias, rank == 0)
            _copy(reader, p + "self_attn.sinks", (config.num_attention_heads,), attn.sinks, 0,
                  plan.q_head_start, plan.q_heads)
            _copy(reader, p + "mlp.router.weight", (experts, hidden), moe.router.weight)
            _copy(reader, p + "mlp.router.bias", (experts,), moe.router.bias)

            e = p + "mlp.experts."
            _copy_experts(reader, e + "gate_up_proj_bias", (experts, 2 * inter), moe.gate_up_proj_bias, 1,
                          2 * i_start, 2 * i_len)
            _copy_or_zero(reader, e + "down_proj_bias", (experts, hidden), moe.down_proj_bias, rank == 0)
            if packed:
                if f"layers.{i}.mlp.gate_up_blocks" not in in_place:  # (else mapped after the layers)
                    _copy_mxfp4_packed(reader, e + "gate_up_proj", 2 * inter, hidden, moe.gate_up_blocks,
                                       moe.gate_up_scales, 2 * i_start, 2 * i_len, 0, hidden)
                    _copy_mxfp4_packed(reader, e + "down_proj", hidden, inter, moe.down_blocks, moe.down_scales,
                                       0, hidden, i_start, i_len)
            elif mxfp4:
                _copy_mxfp4(reader, e + "gate_up_proj", 2 * inter, hidden, moe.gate_up_proj,
                            2 * i_start, 2 * i_len, 0, hidden)
                _copy_mxfp4(reader, e + "down_proj", hidden, inter, moe.down_proj, 0, hidden, i_start, i_len)
            else:
                _copy_experts(reader, e + "gate_up_proj", (experts, hidden, 2 * inter), moe.gate_up_proj, 2,
                              2 * i_start, 2 * i_len)
                _copy_experts(reader, e + "down_proj", (experts, inter, hidden), moe.down_proj, 1, i_start, i_len)
        _use_in_place(model, reader, in_place)


def _used_in_place(model: GptOss) -> dict[str, tuple[str, tuple, tuple | None]]:
    """The parameters this rank uses in place from the mapped checkpoint (`SafetensorsReader.map`) instead of
    copying them: name -> (checkpoint tensor, its shape, this rank's rows or None). Published weights only, and
    only where the rank's tensor is the file's bytes as they lie: each layer's MXFP4 expert blocks and scales
    when the rank holds every row of them (one rank: a split takes some rows of each expert, or zeroes codes),
    and the embedding when the rank's vocabulary rows are unpadded. The other matrices are streamed whole by
    every decode step: they are copied onto the arena, whose anonymous memory gets huge pages wherever THP is
    not off, where a file's page cache gets them only as far as it holds 2 MiB folios."""
    config, plan = model.config, model.plan
    hidden, experts, inter = config.hidden_size, config.num_local_experts, config.intermediate_size
    if model.weights != "published":
        return {}
    mapped = {}
    if plan.vocab_start + plan.vocab <= config.vocab_size:
        mapped["embed_tokens"] = ("model.embed_tokens.weight", (config.vocab_size, hidden),
                                  (plan.vocab_start, plan.vocab_start + plan.vocab))
    for i, block in enumerate(model.layers):
        if block.mlp.packed and plan.intermediate == inter:
            e = f"model.layers.{i}.mlp.experts."
            for weight, out, width in (("gate_up", 2 * inter, hidden), ("down", hidden, inter)):
                shape = (experts, out, width // MXFP4_BLOCK)
                mapped[f"layers.{i}.mlp.{weight}_blocks"] = (e + f"{weight}_proj_blocks", (*shape, 16), None)
                mapped[f"layers.{i}.mlp.{weight}_scales"] = (e + f"{weight}_proj_scales", shape, None)
    return mapped


def _use_in_place(model: GptOss, reader: SafetensorsReader, in_place: dict) -> None:
    for name, (tensor, shape, rows) in in_place.items():
        module, _, attr = name.rpartition(".")
        owner = model.get_submodule(module)
        view, held = reader.map(tensor, shape, rows), getattr(owner, attr)
        if view.shape != held.shape or view.dtype != held.dtype:
            raise CheckpointError(f"checkpoint tensor '{tensor}' is {view.dtype} {list(view.shape)} for this rank, "
                                  f"but the model holds {held.dtype} {list(held.shape)} there")
        setattr(owner, attr, torch.nn.Parameter(view, requires_grad=False))


def _copy_or_zero(reader, name, expected, dst, owner: bool) -> None:
    if owner:
        _copy(reader, name, expected, dst)
    else:
        reader.check(name, expected)
        dst.zero_()


def _check_size(model: GptOss, reader: SafetensorsReader) -> None:
    """Before allocating: a config.json whose sizes the weights cannot fill (a damaged or mismatched file) is
    refused here rather than by an allocation of its size. Every element takes at least half a byte on disk."""
    needed, held = sum(p.numel() for p in model.parameters()), reader.nbytes()
    if needed > 2 * held:
        raise CheckpointError(f"config.json describes {needed:,} parameters but {reader.source} holds only "
                              f"{held:,} bytes of tensors: config.json does not belong to these weights")


def load_model(model_dir, *, tp_size: int = 1, rank: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", ops: str = "torch", ops_mode: str = "eager",
               weights: str | None = None, mmap: bool = True) -> GptOss:
    """Build this rank's model for `model_dir` and fill it. The model's memory is allocated once, uninitialised,
    and every parameter is written from the checkpoint. `dtype` is the activations' dtype; `weights` ("dense" or
    "published", default DEFAULT_WEIGHTS) how the weights are held (see the module docstring); the model records
    it as `model.weights`. `mmap` (CPU, published weights): the tensors whose in-memory form is the file's
    (`_used_in_place`: the MXFP4 experts and the embedding, 82% of gpt-oss-20b's bytes) are used in place from
    the mapped checkpoint rather than copied; the files must then not change while the model lives."""
    weights = weights or DEFAULT_WEIGHTS
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weights='{weights}'; available: {list(WEIGHT_FORMATS)}")
    if weights == "published" and torch.device(device).type != "cpu":
        raise ValueError(f"weights='published' has kernels for CPU only; on '{torch.device(device).type}' load "
                         f"weights='dense'")
    config = GptOssConfig.from_pretrained(model_dir)
    reader = SafetensorsReader(model_dir)
    packed = weights == "published" and _is_mxfp4(reader, config)
    with torch.device("meta"):
        model = GptOss(config, Parallel(tp_size, rank), ops=ops, ops_mode=ops_mode, weights=weights,
                       packed_experts=packed).to(dtype)
        if weights == "published":
            _keep_stored_dtypes(model, reader)
    _check_size(model, reader)
    # host weights go on huge pages (a decode step streams them all: see host_memory)
    on_host = torch.device(device).type == "cpu"
    in_place = _used_in_place(model) if mmap and on_host else {}
    model = to_host(model, skip=frozenset(in_place)) if on_host else model.to_empty(device=device)
    # The rope table is not a checkpoint tensor, and the meta device dropped its values: compute it (fp32).
    model.inv_freq = yarn_inv_freq(config.head_dim, config.rope)[0].to(device)
    load_weights(model, model_dir, in_place)
    return model.eval().requires_grad_(False)


__all__ = ["load_model", "load_weights", "CheckpointError", "ConfigError"]
