"""GPT-OSS configuration read from a checkpoint's `config.json`.

Only what the architecture uses is kept. Anything the model cannot honour (another model type, an activation it
does not implement, a RoPE scaling it does not know, a quantisation it cannot read) is refused with a message that
names the field, rather than silently ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config.json value this runtime does not support."""


@dataclass(frozen=True)
class RopeScaling:
    theta: float = 150000.0
    kind: str = "yarn"  # "yarn" or "default"
    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = False
    attention_factor: float | None = None


@dataclass(frozen=True)
class GptOssConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    intermediate_size: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope: RopeScaling = field(default_factory=RopeScaling)
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    max_position_embeddings: int = 131072
    quant_method: str | None = None  # None or "mxfp4": how expert weights are stored on disk
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def to_json(self) -> dict:
        """A canonical, JSON-serialisable view (used for artifact keys)."""
        d = dict(self.__dict__)
        d["rope"] = dict(self.rope.__dict__)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, raw: dict) -> "GptOssConfig":
        return _parse(raw)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "GptOssConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a GPT-OSS checkpoint directory needs a config.json")
        with open(path) as f:
            return _parse(json.load(f))


def _require(raw: dict, key: str):
    if key not in raw or raw[key] is None:
        raise ConfigError(f"config.json: required field '{key}' is missing")
    return raw[key]


def _parse_rope(raw: dict) -> RopeScaling:
    # transformers >= 5 writes `rope_parameters` (theta inside); older checkpoints (and the published ones)
    # write `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 150000.0)))
    kind = params.get("rope_type", params.get("type", "default" if not params else "yarn"))
    if kind == "default":
        return RopeScaling(theta=theta, kind="default", factor=1.0)
    if kind != "yarn":
        raise ConfigError(f"config.json: rope type '{kind}' is not supported (GPT-OSS uses 'yarn' or 'default')")
    for k in ("mscale", "mscale_all_dim"):
        if params.get(k):
            raise ConfigError(f"config.json: rope parameter '{k}' is not supported for GPT-OSS")
    if "partial_rotary_factor" in params and float(params["partial_rotary_factor"]) != 1.0:
        raise ConfigError("config.json: partial_rotary_factor != 1 is not supported for GPT-OSS")
    return RopeScaling(
        theta=theta,
        kind="yarn",
        factor=float(_require(params, "factor")),
        original_max_position_embeddings=int(_require(params, "original_max_position_embeddings")),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
        attention_factor=params.get("attention_factor"),
    )


def _parse(raw: dict) -> GptOssConfig:
    model_type = raw.get("model_type")
    if model_type != "gpt_oss":
        raise ConfigError(f"config.json: model_type '{model_type}' is not supported (expected 'gpt_oss')")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act '{act}' is not supported (GPT-OSS uses its clamped SwiGLU)")
    if raw.get("attention_bias", True) is not True:
        raise ConfigError("config.json: attention_bias=false is not supported (GPT-OSS has q/k/v/o biases)")
    if raw.get("tie_word_embeddings", False):
        raise ConfigError("config.json: tie_word_embeddings=true is not supported (GPT-OSS has an untied lm_head)")

    heads = int(_require(raw, "num_attention_heads"))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    hidden = int(_require(raw, "hidden_size"))
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if head_dim % 2:
        raise ConfigError(f"config.json: head_dim={head_dim} must be even for RoPE")
    layers = int(_require(raw, "num_hidden_layers"))
    window = int(raw.get("sliding_window") or 0)
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
    ]
    if len(layer_types) != layers:
        raise ConfigError(f"config.json: layer_types has {len(layer_types)} entries for {layers} layers")
    for t in layer_types:
        if t not in ("sliding_attention", "full_attention"):
            raise ConfigError(f"config.json: layer type '{t}' is not supported")
    if "sliding_attention" in layer_types and window <= 0:
        raise ConfigError("config.json: sliding_attention layers need a positive sliding_window")
    experts = int(_require(raw, "num_local_experts"))
    top_k = int(_require(raw, "num_experts_per_tok"))
    if not 0 < top_k <= experts:
        raise ConfigError(f"config.json: num_experts_per_tok={top_k} must be in 1..num_local_experts={experts}")

    quant = raw.get("quantization_config")
    quant_method = None
    if quant:
        quant_method = quant.get("quant_method")
        if quant_method != "mxfp4":
            raise ConfigError(f"config.json: quantization '{quant_method}' is not supported (only 'mxfp4')")

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return GptOssConfig(
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        intermediate_size=int(_require(raw, "intermediate_size")),
        sliding_window=window,
        layer_types=tuple(layer_types),
        rope=_parse_rope(raw),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
        quant_method=quant_method,
        eos_token_ids=eos_ids,
        pad_token_id=raw.get("pad_token_id"),
    )
