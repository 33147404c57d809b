"""Tables whole at any terminal width: columns fold rather than cut, the least needed go first."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text


def _needed(column) -> int:
    """The narrowest a column can be without cutting a cell: its longest header word, its
    longest cell (numbers do not wrap); a no_wrap column (a model spec) its whole header too."""
    if column.no_wrap:
        return _natural(column)
    words = str(column.header).split() or [""]
    return max([*map(len, words), *map(_length, column.cells)])


def _natural(column) -> int:
    """The width of a column's header and cells on one line each (a table may have no rows)."""
    return max([len(str(column.header)), *map(_length, column.cells)])


def natural_width(table: Table) -> int:
    """The width at which no header or cell of `table` wraps."""
    return sum(_natural(c) + 3 for c in table.columns) + 1


def _length(cell) -> int:
    return len(Text.from_markup(cell).plain) if isinstance(cell, str) else len(str(cell))


def fit(table: Table, width: int | None, drop_order: tuple[str, ...] = ()) -> Table:
    """The table with every cell whole: at `width` (None: any width) the columns of
    `drop_order` are dropped, first first, until the rest fits with headers wrapped; cells are
    never cut to '…'. The caption says what was dropped; --wide shows everything."""
    columns = list(table.columns)

    def total(cols, size) -> int:
        return sum(size(c) + 3 for c in cols) + 1

    dropped = []
    for name in drop_order:
        if width is None or total(columns, _needed) <= width:
            break
        keep = [c for c in columns if str(c.header) != name]
        if len(keep) < len(columns):
            columns, dropped = keep, [*dropped, name]
    squeeze = width is not None and total(columns, _natural) > width
    widths = _squeezed(columns, width) if squeeze else {}
    fitted = Table(title=table.title, caption=table.caption)
    if dropped:
        note = f"not shown at this width: {', '.join(dropped)} (vitport --wide shows them)"
        fitted.caption = f"{table.caption}; {note}" if table.caption else note
    for column in columns:
        fitted.add_column(
            column.header,
            justify=column.justify,
            overflow="fold",
            no_wrap=column.no_wrap,
            width=widths.get(id(column)),
        )
    cells = [list(c.cells) for c in columns]
    for index, row in enumerate(table.rows):
        fitted.add_row(*(c[index] for c in cells), style=row.style)
    return fitted


def _squeezed(columns: list, width: int) -> dict[int, int]:
    """Column widths (by id) for a table wider than `width`: cells whole, headers wrapped; a
    no_wrap column (a model spec) keeps its natural width and the others give way first, the
    widest first, down to their longest header word."""
    widths = {id(c): _needed(c) for c in columns}
    floors = {id(c): max(map(len, str(c.header).split() or [""])) for c in columns}
    excess = sum(widths.values()) + 3 * len(columns) + 1 - width
    flexible = [id(c) for c in columns if not c.no_wrap]
    while excess > 0:
        widest = max(flexible, key=lambda key: widths[key] - floors[key], default=None)
        if widest is None or widths[widest] <= floors[widest]:
            break  # no room left: rich cuts what it must
        widths[widest] -= 1
        excess -= 1
    return widths
