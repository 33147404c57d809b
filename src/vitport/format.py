"""Numbers as text, the same in the CLI tables and the report. No computation happens here."""

from __future__ import annotations

import math


def num(value: float | None) -> str:
    """Three significant digits; 'n/a' for a missing or NaN value."""
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


def pct(value: float | None) -> str:
    """An error or agreement as a percentage, four significant digits."""
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{100 * value:.4g}%"


def share(value: float | None) -> str:
    """A utilisation such as MFU, one decimal."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def ratio(value: float | None) -> str:
    """How many times a value is another ('x floor'): whole numbers from 10 up, one decimal below."""
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:,.0f}x" if value >= 10 else f"{value:.1f}x"


def improvement(before: float, after: float) -> str:
    """How many times smaller the error became: 'exact' when it vanished, '-' when both are 0."""
    if after == 0:
        return "-" if before == 0 else "exact"
    if after > before:
        return "worse"
    return f"{before / after:.2g}x"


def gib(value: int | None) -> str:
    """Bytes in GiB, two decimals."""
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def count(number: int, noun: str, plural: str | None = None) -> str:
    """'1 image', '2 images', '0 images': a count with its noun in the right number."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"
