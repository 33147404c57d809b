"""Result records (dataclasses) to and from JSON-ready dicts, one field after another.

The plain fields need no code of their own: a nested record becomes a dict (through its own
``to_dict`` where it has one), a tuple becomes a list and comes back as a tuple, a field
declared ``int``, ``float``, ``str`` or ``bool`` is read back as one, and a field missing from
older JSON takes its default. Only the fields whose JSON form differs (floats written as
strings, numbers as keys, nested records to rebuild) are named, each with its converter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar

__all__ = ["from_dict", "insert_after", "json_safe", "plain", "to_dict"]

Record = TypeVar("Record")
SCALARS: dict[str, Callable[[Any], Any]] = {"int": int, "float": float, "str": str, "bool": bool}


def plain(value: Any) -> Any:
    """`value` as JSON-ready data: records as dicts, tuples as lists."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float as the string "inf", "-inf" or "nan", so that
    strict JSON readers take it (``json.dumps`` would write the non-JSON ``Infinity``/``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def to_dict(record: Any, **convert: Callable[[Any], Any]) -> dict[str, Any]:
    """Every field of `record`, in declaration order; `convert` maps a field name to the
    function that writes it (:func:`plain` for the others)."""
    return {f.name: convert.get(f.name, plain)(getattr(record, f.name)) for f in fields(record)}


def from_dict(
    cls: type[Record], data: Mapping[str, Any], **convert: Callable[[Any], Any]
) -> Record:
    """`cls` rebuilt from :func:`to_dict`'s form; keys that are not fields (derived values) are
    ignored, and a missing field without a default raises ``KeyError`` as ``data[name]`` would."""
    values = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise KeyError(f.name)
            continue
        read = convert.get(f.name) or (lambda value, kind=f.type: _typed(kind, value))
        values[f.name] = read(data[f.name])
    return cls(**values)


def insert_after(data: dict[str, Any], key: str, **extra: Any) -> dict[str, Any]:
    """`data` with `extra` placed right after `key` (a derived value beside its fields)."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        out[name] = value
        if name == key:
            out.update(extra)
    return out


def _typed(kind: Any, value: Any) -> Any:
    """`value` read back as its field's declared type, where JSON loses it."""
    name = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
    if name in SCALARS:
        return SCALARS[name](value)
    if name.startswith("tuple") and isinstance(value, list):
        return tuple(value)
    return value
