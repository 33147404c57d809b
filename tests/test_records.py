"""records: result dataclasses to and from JSON-ready dicts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from vitport import records


@dataclass(frozen=True)
class Inner:
    name: str
    size: tuple[int, int]


@dataclass
class Outer:
    count: int
    inner: Inner
    ratio: float = 0.5
    tags: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)


def test_to_dict_keeps_field_order_and_writes_tuples_as_lists():
    outer = Outer(3, Inner("a", (2, 4)), tags=("x",))
    data = records.to_dict(outer)
    assert list(data) == ["count", "inner", "ratio", "tags", "notes"]
    assert data == {
        "count": 3,
        "inner": {"name": "a", "size": [2, 4]},
        "ratio": 0.5,
        "tags": ["x"],
        "notes": [],
    }
    assert records.to_dict(outer, count=str)["count"] == "3"


def test_from_dict_round_trips_and_reads_types_back():
    outer = Outer(3, Inner("a", (2, 4)), tags=("x", "y"), notes=["n"])
    data = json.loads(json.dumps(records.to_dict(outer)))
    back = records.from_dict(Outer, data, inner=lambda d: records.from_dict(Inner, d))
    assert back == outer and isinstance(back.tags, tuple) and isinstance(back.inner.size, tuple)
    assert records.from_dict(Inner, {"name": 7, "size": [1, 1]}).name == "7"


def test_from_dict_defaults_missing_fields_and_ignores_derived_keys():
    back = records.from_dict(Outer, {"count": "2", "inner": None, "derived": 1.0})
    assert back == Outer(2, None)
    with pytest.raises(KeyError, match="count"):
        records.from_dict(Outer, {"inner": None})


def test_insert_after_places_derived_values_beside_their_fields():
    assert list(records.insert_after({"a": 1, "b": 2}, "a", x=0)) == ["a", "x", "b"]
