"""The mapping tables, one per pair of layouts and family, as data, gathered from the families.

Each family module writes its tables (see `vitport.families.base.Conversion`): transformers names
are those of its checkpoint files (what `save_pretrained` writes and every transformers version
reads), without a head model's base prefix (`vit.`). Each table is written once in one direction;
the other direction is its inverse.
"""

from __future__ import annotations

from vitport.convert.engine import Table
from vitport.families.base import conversions


def tables() -> dict[tuple[str, str, str], Table]:
    """Every registered table by (source layout, target layout, architecture key)."""
    return {(t.source, t.target, t.family): t for c in conversions() for t in c.tables}


def dropped_groups() -> dict[str, str]:
    """Output groups that a dropped tensor leaves without a counterpart, so they are not compared:
    {drop reason: group}."""
    return {reason: group for c in conversions() for reason, group in c.dropped_groups.items()}


def table_for(source: str, target: str, family: str) -> Table | None:
    return tables().get((source, target, family))


def __getattr__(name: str) -> object:
    if name == "TABLES":  # the registry decides, so it is computed on use
        return tables()
    if name == "DROPPED_GROUPS":
        return dropped_groups()
    raise AttributeError(name)
