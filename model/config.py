"""GPT-OSS configuration read from a checkpoint's `config.json`.

Only what the architecture uses is kept. Anything the model cannot honour (another model type, an activation it
does not implement, a RoPE scaling it does not know, a quantisation it cannot read) is refused with a message that
names the field, rather than silently ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, ConfigError, json_kind, read_json_object

__all__ = ["ConfigError", "GptOssConfig", "RopeScaling"]


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
    def from_dict(cls, raw: dict, source: str = "config.json") -> "GptOssConfig":
        """`source` names the file in errors."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top level, found {json_kind(raw)}")
        return _parse(_Fields(raw, source))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "GptOssConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: a GPT-OSS checkpoint directory needs a config.json")
        return cls.from_dict(read_json_object(path), str(path))


_MISSING = object()
# No GPT-OSS dimension comes near these; a larger value is a damaged file, and would otherwise reach an allocation.
_MAX_DIM, _MAX_LAYERS = 2 ** 31 - 1, 4096


class _Fields:
    """Typed reads of one JSON object of config.json; every refusal names the file and the field."""

    def __init__(self, raw: dict, source: str, section: str = ""):
        self.raw, self.source, self.section = raw, source, section

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def get(self, key: str, default=_MISSING):
        value = self.raw.get(key)
        if value is None:
            if default is _MISSING:
                raise self.fail(f"required field '{self.section}{key}' is missing")
            return default
        return value

    def int(self, key: str, default=_MISSING, minimum: int = 1, maximum: int = _MAX_DIM) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.fail(f"'{self.section}{key}' must be an integer in {minimum}..{maximum}, found "
                            f"{json_kind(value)}")
        return value

    def number(self, key: str, default=_MISSING, above: float | None = 0.0) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                above is not None and not value > above):
            bound = f" greater than {above:g}" if above is not None else ""
            raise self.fail(f"'{self.section}{key}' must be a number{bound}, found {json_kind(value)}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"'{self.section}{key}' must be true or false, found {json_kind(value)}")
        return value

    def section_of(self, key: str) -> "_Fields":
        value = self.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(f"'{key}' must be an object, found {json_kind(value)}")
        return _Fields(value, self.source, f"{key}.")

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self.get(key, [])
        ids = value if isinstance(value, list) else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise self.fail(f"'{key}' must be a token id or a list of them, found {json_kind(value)}")
        return tuple(ids)


def _parse_rope(raw: _Fields) -> RopeScaling:
    # transformers >= 5 writes `rope_parameters` (theta inside); older checkpoints (and the published ones)
    # write `rope_theta` + `rope_scaling`.
    key = "rope_parameters" if raw.raw.get("rope_parameters") else "rope_scaling"
    params = raw.section_of(key)
    theta = (params.number("rope_theta", above=1.0) if "rope_theta" in params.raw
             else raw.number("rope_theta", 150000.0, above=1.0))  # the log of theta divides in YaRN's ramp
    kind = params.get("rope_type", params.get("type", "default" if not params.raw else "yarn"))
    if kind == "default":
        return RopeScaling(theta=theta, kind="default", factor=1.0)
    if kind != "yarn":
        raise raw.fail(f"rope type '{kind}' is not supported (GPT-OSS uses 'yarn' or 'default')")
    for k in ("mscale", "mscale_all_dim"):
        if params.raw.get(k):
            raise raw.fail(f"rope parameter '{k}' is not supported for GPT-OSS")
    if params.number("partial_rotary_factor", 1.0) != 1.0:
        raise raw.fail("partial_rotary_factor != 1 is not supported for GPT-OSS")
    attention_factor = params.raw.get("attention_factor")
    return RopeScaling(
        theta=theta,
        kind="yarn",
        factor=params.number("factor"),
        original_max_position_embeddings=params.int("original_max_position_embeddings"),
        beta_fast=params.number("beta_fast", 32.0),
        beta_slow=params.number("beta_slow", 1.0),
        truncate=params.flag("truncate", True),
        attention_factor=None if attention_factor is None else params.number("attention_factor"),
    )


def _parse(raw: _Fields) -> GptOssConfig:
    model_type = raw.raw.get("model_type")
    if model_type != "gpt_oss":
        raise raw.fail(f"model_type '{model_type}' is not supported (expected 'gpt_oss')")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise raw.fail(f"hidden_act '{act}' is not supported (GPT-OSS uses its clamped SwiGLU)")
    if raw.raw.get("attention_bias", True) is not True:
        raise raw.fail("attention_bias=false is not supported (GPT-OSS has q/k/v/o biases)")
    if raw.raw.get("tie_word_embeddings") not in (False, None):
        raise raw.fail("tie_word_embeddings=true is not supported (GPT-OSS has an untied lm_head)")

    heads = raw.int("num_attention_heads")
    kv_heads = raw.int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise raw.fail(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    hidden = raw.int("hidden_size")
    head_dim = raw.int("head_dim", max(hidden // heads, 1))
    if head_dim % 2:
        raise raw.fail(f"head_dim={head_dim} must be even for RoPE")
    layers = raw.int("num_hidden_layers", maximum=_MAX_LAYERS)
    window = raw.int("sliding_window", 0, minimum=0)
    layer_types = raw.get("layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
    ]
    if not isinstance(layer_types, list):
        raise raw.fail(f"'layer_types' must be a list, found {json_kind(layer_types)}")
    if len(layer_types) != layers:
        raise raw.fail(f"layer_types has {len(layer_types)} entries for {layers} layers")
    for t in layer_types:
        if t not in ("sliding_attention", "full_attention"):
            raise raw.fail(f"layer type '{t}' is not supported")
    if "sliding_attention" in layer_types and window <= 0:
        raise raw.fail("sliding_attention layers need a positive sliding_window")
    experts = raw.int("num_local_experts")
    top_k = raw.int("num_experts_per_tok")
    if not 0 < top_k <= experts:
        raise raw.fail(f"num_experts_per_tok={top_k} must be in 1..num_local_experts={experts}")
    inter = raw.int("intermediate_size")

    quant_method = None
    quant = raw.section_of("quantization_config")
    if quant.raw:
        quant_method = quant.raw.get("quant_method")
        if quant_method != "mxfp4":
            raise raw.fail(f"quantization '{quant_method}' is not supported (only 'mxfp4')")
        for name, width in (("hidden_size", hidden), ("intermediate_size", inter)):
            if width % 32:  # MXFP4 packs 32-wide blocks along each expert matrix's input
                raise raw.fail(f"{name}={width} is not a multiple of 32, as MXFP4 expert weights need")

    return GptOssConfig(
        vocab_size=raw.int("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        intermediate_size=inter,
        sliding_window=window,
        layer_types=tuple(layer_types),
        rope=_parse_rope(raw),
        rms_norm_eps=raw.number("rms_norm_eps", 1e-5),
        swiglu_alpha=raw.number("swiglu_alpha", 1.702),
        swiglu_limit=raw.number("swiglu_limit", 7.0),
        max_position_embeddings=raw.int("max_position_embeddings", 131072),
        quant_method=quant_method,
        eos_token_ids=raw.token_ids("eos_token_id"),
        pad_token_id=raw.int("pad_token_id", None, minimum=0) if raw.raw.get("pad_token_id") is not None else None,
    )
