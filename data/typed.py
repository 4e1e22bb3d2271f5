"""Typed configs: plain dataclasses (the interface code and recipes use) validated and coerced by
pydantic, which reads nested mappings into them, list element types included, and calls their
``__post_init__`` checks. Every problem becomes one line naming the field, the form the command
line prints as ``lmrec: error: ...``.

A dataclass opts out of unknown keys with ``__pydantic_config__ = {"extra": "forbid"}`` (a plain
attribute, so that the packages defining configs need not import pydantic).
"""

from __future__ import annotations

import dataclasses
import functools

from pydantic import TypeAdapter, ValidationError


class TypedConfigError(ValueError):
    """A value that does not fit its config field; the message is one line."""


@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def _fields_at(cls, path: tuple) -> list[str]:
    """The field names of the dataclass at ``path`` inside ``cls`` (for 'unknown field' hints)."""
    import typing

    for name in path:
        hints = typing.get_type_hints(cls)
        if name not in hints or not dataclasses.is_dataclass(hints[name]):
            return []
        cls = hints[name]
    return sorted(f.name for f in dataclasses.fields(cls))


def describe(error: ValidationError, cls, hints: dict[str, str] | None = None) -> str:
    """One line for every problem pydantic found, each naming its dotted field."""
    parts = []
    for e in error.errors():
        loc = tuple(str(x) for x in e["loc"])
        where = ".".join(loc)
        if e["type"] == "unexpected_keyword_argument":
            known = _fields_at(cls, loc[:-1])
            hint = (hints or {}).get(where)
            parts.append(
                f"unknown config field {where}"
                + (f"; {hint}" if hint else f"; {'.'.join(loc[:-1]) or 'the config'} has {known}")
            )
        elif e["type"] in ("value_error", "assertion_error"):
            # Raised by a __post_init__ check, whose message already names its fields.
            message = str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else e["msg"]
            parts.append(message)
        elif e["type"] == "missing_argument":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where}: {e['msg'].lower()}, got {e['input']!r}")
    return "; ".join(parts)


def parse(cls, values, hints: dict[str, str] | None = None):
    """An instance of dataclass ``cls`` from a (nested) mapping; TypedConfigError otherwise.
    ``hints``: extra words for unknown fields, by dotted name (fields that moved, say)."""
    if not isinstance(values, dict):
        raise TypedConfigError(f"expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as e:
        raise TypedConfigError(describe(e, cls, hints)) from None
