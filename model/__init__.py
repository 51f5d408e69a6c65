"""The tensor-parallel GPT-OSS model: config, op tables, static KV cache, checkpoint loader.

The names below load on first use (lazy_exports.py): `gptoss.model.errors` (the checkpoint errors the tokenizer
raises) must import without torch, for a server's front end."""
from .lazy_exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "ConfigError": ".config", "GptOssConfig": ".config", "GptOss": ".gpt_oss", "KVCache": ".kv_cache",
    "Parallel": ".parallel", "ShardPlan": ".parallel"})
