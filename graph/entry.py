"""The functions graph/ captures. Module-level (not closures or bound methods) so that a compiled, serialised
graph can be bound back to them in another process. `kv_len` is a static int: one graph per value."""
from __future__ import annotations


def prefill_entry(model, ids, start, last, keys, values, kv_len: int):
    return model.prefill(ids, start, last, keys, values, kv_len)


def decode_entry(model, ids, pos, keys, values, kv_len: int):
    return model.decode(ids, pos, keys, values, kv_len)


def mixed_entry(model, ids, pos, keys, values, chunk_ids, start, last, chunk_keys, chunk_values, kv_len: int):
    return model.mixed(ids, pos, keys, values, chunk_ids, start, last, chunk_keys, chunk_values, kv_len)
