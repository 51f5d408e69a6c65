"""The one error a checkpoint file raises when it cannot be used as it is, and the JSON reader that raises it.

Every message starts with the file's path and says what is wrong with it (truncated, not the format it should be,
bad JSON at line N, a field of the wrong kind), so one line tells a user which download to repeat or which field to
fix. Library exceptions (JSONDecodeError, UnicodeDecodeError, ...) never escape raw from reading a checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged, or describes something this runtime cannot load."""


class ConfigError(CheckpointError):
    """A config.json value this runtime does not support (or a setting that does not fit the checkpoint)."""


class _DuplicateKey(Exception):
    pass


def _object(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:  # json keeps the last silently; a damaged or hand-merged file should not load that way
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def decode_text(data: bytes, where: str | Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from e


def parse_json(data: bytes, where: str | Path):
    """`data` parsed as strict JSON (UTF-8, no NaN/Infinity, no repeated keys); `where` names it in errors."""
    text = decode_text(data, where)
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: bad JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except _DuplicateKey as e:
        raise CheckpointError(f"{where}: key '{e.args[0]}' appears twice in one object") from e
    except (ValueError, RecursionError) as e:  # NaN/Infinity, an integer of thousands of digits, deep nesting
        raise CheckpointError(f"{where}: unusable JSON: {e}") from e


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {e.strerror or e}") from e


def read_text(path: Path) -> str:
    return decode_text(read_file(path), path)


def read_json(path: Path):
    return parse_json(read_file(path), path)


def read_json_object(path: Path) -> dict:
    """A JSON file whose top level must be an object (config.json, the index, generation_config.json, ...)."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level, found {json_kind(doc)}")
    return doc


def json_kind(value) -> str:
    """How a JSON value reads to a user: 'a string ("x")', 'a number (3)', 'a list', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({json.dumps(value[:40])})"
    return "a list" if isinstance(value, list) else "an object"
