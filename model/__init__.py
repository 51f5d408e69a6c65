"""The tensor-parallel GPT-OSS model: config, op tables, static KV cache, checkpoint loader."""
from .config import ConfigError, GptOssConfig
from .gpt_oss import GptOss
from .kv_cache import KVCache
from .parallel import Parallel, ShardPlan

__all__ = ["ConfigError", "GptOssConfig", "GptOss", "KVCache", "Parallel", "ShardPlan"]
