"""Errors for a request's bad settings that carry the setting's name, so a server names the field in its reply
without reading the message."""
from __future__ import annotations


def invalid(field: str, message: str, *, kind: type[Exception] = ValueError, code: str | None = None) -> Exception:
    """`kind(message)` (ValueError, or TypeError for a value of the wrong type) with `.field` (the setting, as the
    API names it) and `.code` (an OpenAI error code, or None)."""
    exc = kind(message)
    exc.field, exc.code = field, code
    return exc
